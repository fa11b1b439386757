"""SQLAlchemy models: the database is the truth of every job (Celery only carries the job id).

Rows are ordered by an integer `seq` (insertion order) for pagination; public ids are random strings.
Times are unix seconds, as on the wire.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The statuses of a job not yet ended (core.jobs.JobStatus; the terminal ones are counted in job_end_counts).
ACTIVE_JOBS = "status IN ('queued', 'running', 'paused')"


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    """A tenant: API keys map to projects; files, jobs and models of one are invisible to the others."""

    __tablename__ = "projects"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class File(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # uploaded | processed | error
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    n_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)  # valid examples found at upload
    # "supervised" (examples) or "preference" (pairs, for method dpo): what the upload's validation found; None if it failed
    kind: Mapped[str | None] = mapped_column(String(16), nullable=True)


def file_is_live(at: int | None = None):  # noqa: ANN201 (a SQL expression)
    """Files past their `expires_at` are gone for every reader at once; the sweeper deletes them later."""
    return (File.expires_at.is_(None)) | (File.expires_at > (now() if at is None else at))


class Upload(Base):
    """A large file arriving in parts (POST /v1/uploads): `bytes` is reserved against the project's stored-bytes
    limit from creation until it completes (then the file counts), is cancelled or expires."""

    __tablename__ = "uploads"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    mime_type: Mapped[str] = mapped_column(String(256))
    bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | completed | cancelled (expired: pending past expires_at)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    file_expires_after: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # seconds, for the file made at completion
    file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class UploadPart(Base):
    """One part of an upload, stored as its own object until the upload completes, is cancelled or expires."""

    __tablename__ = "upload_parts"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Job(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"))  # indexed with seq and with status (below)
    model: Mapped[str] = mapped_column(String(256))  # as the request named it: a base, or the fine-tuned model it continues
    # The base model directory the adapter is trained on: `model` itself, or the base under the fine-tuned model it
    # continues from (core/fine_tuned_models.py). None only on rows written before the column (read as `model`).
    base_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The hyperparameters object as the request gave it, and the options resolved from it once, at the request
    # (`TrainingConfig.resolved()`: every option, the seed included). The wire's `hyperparameters`, `method` and
    # `seed` are rendered from these two (contract.hyperparameters.wire_hyperparameters); the worker builds its config from the second.
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    integrations: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # Set by DELETE /v1/models/{model}: the job stays, its model and checkpoint models are no longer served.
    model_deleted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The optimizer steps the job trains in all (its worker writes it once the model is loaded) and the estimated
    # peak GPU memory made at creation (contract.memory.MemoryEstimate.to_dict(); None when the base's config.json
    # allows none). The per-step numbers live in job_metrics.
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory_estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Worker bookkeeping (not on the wire).
    worker_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    enqueued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    resume_checkpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pause_requested_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # POST .../pause while it ran

    # The control plane's hot reads by project (docs/operations.md "Scale"): its jobs newest first, its active jobs
    # counted under its row lock, and its jobs waiting their turn (a partial index: small however long the backlog).
    @property
    def trained_base(self) -> str:
        """The base model directory the job's adapter is trained on (and served and merged on)."""
        return self.base_model or self.model

    @property
    def continues(self) -> str | None:
        """The fine-tuned model the job continues from (its adapter is the job's initial weights), or None."""
        return self.model if self.base_model is not None and self.model != self.base_model else None

    __table_args__ = (
        Index("ix_jobs_project_seq", "project", "seq"),
        Index("ix_jobs_project_status", "project", "status"),
        Index("ix_jobs_unsent", "project", "seq", postgresql_where=text("status = 'queued' AND enqueued_at IS NULL"),
              sqlite_where=text("status = 'queued' AND enqueued_at IS NULL")),
        # The queued jobs whose message waits in the broker, by send time: the sweeper's expired and lost messages.
        Index("ix_jobs_sent", "enqueued_at", postgresql_where=text("status = 'queued' AND enqueued_at IS NOT NULL"),
              sqlite_where=text("status = 'queued' AND enqueued_at IS NOT NULL")),
        # The jobs not yet ended, by status: /metrics counts them without reading the finished history.
        Index("ix_jobs_active_status", "status", postgresql_where=text(ACTIVE_JOBS), sqlite_where=text(ACTIVE_JOBS)),
    )


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8))  # info | warn | error
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)


class JobOutbox(Base):
    """"A job ended": one row per job that reached a terminal status, written by `core.jobs.transition` in the same
    transaction as the move. The `qlora.job_ended` task (core/job_events.py) does what follows a job's end and sets
    `handled_at`; the sweeper sends the task again for a row left unhandled (its message lost)."""

    __tablename__ = "job_outbox"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(32))  # the terminal status: succeeded | failed | cancelled
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # the sweeper's last resend
    handled_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


class WebhookEndpoint(Base):
    """A URL of a project's that receives its job-end events, signed with `secret` (Standard Webhooks, core/webhooks.py).
    After a rotation that keeps the old secret active, deliveries carry a signature by each until
    `previous_secret_until`. Disabled (with its reason) when its deliveries keep failing."""

    __tablename__ = "webhook_endpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name"))
    name: Mapped[str] = mapped_column(String(256))
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[list[Any]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    previous_secret_until: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Deliveries that used up every attempt since the last one that succeeded, and when the first attempt of that run
    # failed: what disables the endpoint (core/webhooks.py `record_attempt`).
    failed_deliveries_in_a_row: Mapped[int] = mapped_column(Integer, default=0)
    failing_since: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)

    __table_args__ = (Index("ix_webhook_endpoints_project_seq", "project", "seq"),)


class WebhookDelivery(Base):
    """One event for one endpoint, written with the job end's handled mark (core/job_events.py): its id is the
    `webhook-id` of every attempt, its body is signed anew (with a fresh timestamp) at each. pending -> delivered |
    failed; `next_attempt_at` is when the next attempt is due, `lease_until` how long a claimed attempt may take."""

    __tablename__ = "webhook_deliveries"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    outbox_id: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # the last send of its task message
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (Index("ix_webhook_deliveries_endpoint_seq", "endpoint_id", "seq"),
                      UniqueConstraint("outbox_id", "endpoint_id", name="uq_webhook_deliveries_outbox_endpoint"))


class WebhookAttempt(Base):
    """One POST of a delivery: when, how long, and the status code or the error (the project's delivery log)."""

    __tablename__ = "webhook_attempts"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    attempted_at: Mapped[float] = mapped_column(Float)
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index("ix_webhook_attempts_delivery_seq", "delivery_id", "seq"),)


class JobMetric(Base):
    __tablename__ = "job_metrics"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_job_metrics_job_step"),)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(String(512))  # .tar.gz of the checkpoint directory (adapter + trainer state)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(512))

    __table_args__ = (Index("ix_checkpoints_job_seq", "job_id", "seq"),)


class CheckpointPermission(Base):
    """A checkpoint model shared with another project (POST /v1/fine_tuning/checkpoints/{name}/permissions): that
    project may use it (chat) while the row exists and the job's model is not deleted."""

    __tablename__ = "checkpoint_permissions"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"))
    project: Mapped[str] = mapped_column(String(128))  # the project granted
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)

    __table_args__ = (UniqueConstraint("checkpoint_id", "project", name="uq_checkpoint_permissions_checkpoint_project"),)


class Export(Base):
    """A merged export of a succeeded job's model (POST /v1/fine_tuning/jobs/{id}/export): the adapter merged into
    the 16-bit base, as a `fine-tune-results` file once it succeeds."""

    __tablename__ = "exports"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued | running | succeeded | failed
    file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Worker bookkeeping (not on the wire).
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    enqueued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The bytes the export holds against the project's stored-bytes limit while queued or running (core/quotas.py).
    reserved_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (Index("ix_exports_job_seq", "job_id", "seq"),)


class JobEndCount(Base):
    """Jobs ended with each terminal status since the database was made, one row per status (the migration makes
    them, counting the jobs already ended): written in the transaction that ends a job (core.jobs.record_job_ended),
    read by /metrics instead of counting the whole history of the jobs table at every scrape."""

    __tablename__ = "job_end_counts"
    status: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class SweeperAction(Base):
    """What the sweeper did since the database was made, one row per action (the migration makes them): `sweeps`
    counts passes (its `updated_at`: the last one), the others the jobs, exports and files it acted on."""

    __tablename__ = "sweeper_actions"
    action: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[float | None] = mapped_column(Float, nullable=True)
