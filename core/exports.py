"""Merged exports: the moves of an export row and the deletion of a fine-tuned model.

An export goes queued -> running -> succeeded | failed. As with jobs, every move is one conditional UPDATE, so a
redelivered task cannot run an export twice and a worker that lost its export writes nothing. A running export's
worker writes a heartbeat; the sweeper fails one whose heartbeat stopped (`worker_lost`), so that a new POST can
start another. The caller commits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.jobs import add_event
from core.models import Checkpoint, Export, File, Job, now


class ExportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


ACTIVE = (ExportStatus.QUEUED.value, ExportStatus.RUNNING.value)


def adapter_filename(job_id: str) -> str:
    return f"{job_id}-adapter.tar.gz"


def merged_filename(job_id: str) -> str:
    return f"{job_id}-merged.tar.gz"


def mark_export_enqueued(session: Session, export_id: str) -> None:
    session.execute(update(Export).where(Export.id == export_id).values(enqueued_at=time.time()))


def claim_export(session: Session, export_id: str, worker_id: str) -> bool:
    """queued -> running; only one claim succeeds."""
    result = session.execute(
        update(Export).where(Export.id == export_id, Export.status == ExportStatus.QUEUED.value)
        .values(status=ExportStatus.RUNNING.value, worker_id=worker_id, started_at=now(), heartbeat_at=time.time())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def export_heartbeat(session: Session, export_id: str, worker_id: str) -> bool:
    """Record that the worker running the export is alive; False when it no longer holds it."""
    result = session.execute(
        update(Export).where(Export.id == export_id, Export.status == ExportStatus.RUNNING.value, Export.worker_id == worker_id)
        .values(heartbeat_at=time.time()).execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def fail_lost_exports(session: Session, *, heartbeat_timeout_s: float) -> list[str]:
    """Fail the running exports whose heartbeat is older than `heartbeat_timeout_s` (their worker died), with an
    error event on the job. An export is not resumed: merging again from the start is what a new POST does."""
    stale_before = time.time() - heartbeat_timeout_s
    stale = session.execute(
        select(Export.id, Export.job_id).where(Export.status == ExportStatus.RUNNING.value, Export.heartbeat_at < stale_before)
    ).all()
    message = "The worker running this export stopped responding."
    failed = []
    for export_id, job_id in stale:
        moved = session.execute(
            update(Export).where(Export.id == export_id, Export.status == ExportStatus.RUNNING.value, Export.heartbeat_at < stale_before)
            .values(status=ExportStatus.FAILED.value, finished_at=now(), error={"code": "worker_lost", "message": message})
            .execution_options(synchronize_session=False)
        ).rowcount == 1
        if moved:
            add_event(session, job_id, "error", f"Export {export_id} failed: {message}")
            failed.append(export_id)
    return failed


def finish_export(session: Session, export_id: str, worker_id: str, *, file_id: str | None = None,
                  error: dict[str, str] | None = None) -> bool:
    """running -> succeeded (with `file_id`) or failed (with `error`), only while `worker_id` holds it."""
    status = ExportStatus.FAILED if error is not None else ExportStatus.SUCCEEDED
    result = session.execute(
        update(Export).where(Export.id == export_id, Export.status == ExportStatus.RUNNING.value, Export.worker_id == worker_id)
        .values(status=status.value, file_id=file_id, error=error, finished_at=now())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def expired_queued_exports(session: Session, *, expires_s: float) -> list[str]:
    """Queued exports whose task expired before a worker took it (those never sent wait their turn: core/dispatch.py)."""
    cutoff = time.time() - expires_s
    return list(session.execute(
        select(Export.id).where(Export.status == ExportStatus.QUEUED.value, Export.enqueued_at < cutoff)
    ).scalars())


def lock_live_model_job(session: Session, job_id: str) -> Job | None:
    """The job, row-locked, if its model is not deleted. The model's deletion and an export's commit both take
    this lock first, so one lands wholly before the other."""
    return session.execute(
        select(Job).where(Job.id == job_id, Job.model_deleted_at.is_(None)).with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


@dataclass
class DeletedModel:
    """What deleting a fine-tuned model removed: row changes are committed by the caller, then `object_keys` deleted."""

    file_ids: list[str] = field(default_factory=list)
    checkpoint_ids: list[str] = field(default_factory=list)
    export_ids: list[str] = field(default_factory=list)
    object_keys: list[str] = field(default_factory=list)
    served_models: list[str] = field(default_factory=list)  # the model and checkpoint-model names an inference backend may hold


def delete_model_rows(session: Session, job: Job) -> DeletedModel:
    """Mark `job`'s model deleted and remove the rows of everything that holds its weights: the adapter result
    file, the checkpoints, the exports and their merged files. The metrics CSV stays (it holds no weights) and so
    does the job. The caller holds the job's row lock (`lock_live_model_job`) and commits before deleting the
    objects, so a failed object delete leaves an orphaned object, never a row pointing at nothing."""
    gone = DeletedModel()
    exports = list(session.execute(select(Export).where(Export.job_id == job.id)).scalars())
    gone.export_ids = [e.id for e in exports]
    weight_files = [f for f in session.execute(select(File).where(File.id.in_(list(job.result_files or [])))).scalars()
                    if f.filename == adapter_filename(job.id)]
    weight_files += list(session.execute(
        select(File).where(File.id.in_([e.file_id for e in exports if e.file_id]))).scalars())
    gone.file_ids = [f.id for f in weight_files]
    checkpoints = list(session.execute(select(Checkpoint).where(Checkpoint.job_id == job.id)).scalars())
    gone.checkpoint_ids = [c.id for c in checkpoints]
    gone.object_keys = [f.storage_key for f in weight_files] + [c.storage_key for c in checkpoints]
    gone.served_models = [job.fine_tuned_model or ""] + [c.fine_tuned_model_checkpoint for c in checkpoints]

    session.execute(delete(Export).where(Export.job_id == job.id))
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id))
    if gone.file_ids:
        session.execute(delete(File).where(File.id.in_(gone.file_ids)))
    job.result_files = [file_id for file_id in (job.result_files or []) if file_id not in gone.file_ids]
    job.model_deleted_at = now()
    return gone
