"""One settings object for the API and the workers, read from QLORA_* environment variables.

Defaults give the embedded mode: everything under $QLORA_HOME (./.qlora), SQLite, a local object directory and
Celery's SQLAlchemy transport on a SQLite file as the broker, so nothing needs a server. docs/operations.md
lists every variable.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QLORA_", extra="ignore")

    home: Path = Field(Path(".qlora"), description="Data directory: SQLite files, local objects, models/, the generated API key.")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///$QLORA_HOME/qlora.db. Production: postgresql+psycopg://...")
    broker_url: str = Field("", description="Celery broker; default sqla+sqlite:///$QLORA_HOME/broker.db. Production: redis://host:6379/0")
    storage: Literal["local", "s3", ""] = Field("", description="Object storage backend; default s3 when QLORA_S3_BUCKET is set, else local.")
    storage_dir: Path | None = Field(None, description="Root of the local backend; default $QLORA_HOME/objects.")
    s3_endpoint: str | None = Field(None, description="S3 API endpoint (MinIO: http://minio:9000); unset for AWS.")
    s3_bucket: str | None = Field(None, description="Bucket for datasets, checkpoints and results.")
    s3_region: str | None = Field(None, description="S3 region; the usual AWS_* variables also apply.")
    models_dir: Path | None = Field(None, description="Base models the service can train, one directory each; default $QLORA_HOME/models.")
    api_keys: str = Field("", description="Comma-separated 'key' or 'key=project'; empty: the key in $QLORA_HOME/api_key.")
    db_pool_size: int = Field(10, ge=1, description="Database connections each API process keeps open.")
    db_max_overflow: int = Field(10, ge=0, description="Extra database connections an API process may open under load, beyond db_pool_size.")
    max_active_jobs_per_project: int = Field(100, ge=1, description="Queued and running jobs a project may have at once (429 quota_exceeded above).")
    max_queued_jobs_per_project: int = Field(100, ge=1, description="Queued jobs a project may have waiting at once (429 quota_exceeded above).")
    max_running_jobs_per_project: int = Field(100, ge=1, description="Jobs of one project that may run at once; its further queued jobs wait (in the database, not the broker) for one to end.")
    queued_messages_per_project: int = Field(1, ge=1, description="Task messages of one project waiting in the broker at once; the rest wait in the database, so another project's job waits behind at most this many.")
    max_stored_bytes_per_project: int = Field(100 << 30, ge=1, description="Bytes of files (uploads and results) a project may keep (an upload past it gets 429 quota_exceeded).")
    max_job_seconds: float = Field(7 * 24 * 3600, gt=0, description="Wall-clock time a run of a job may train; past it the worker stops it and fails it with job_timeout.")
    max_steps_per_job: int = Field(1_000_000, ge=1, description="Most optimizer steps a job may ask for (max_steps, or n_epochs over the training file); more is a 400.")
    max_upload_bytes: int = Field(1 << 30, ge=1, description="Largest accepted upload (413 above).")
    max_multipart_upload_bytes: int = Field(8 << 30, ge=1, description="Largest file made with the Uploads API (POST /v1/uploads, in parts of up to 64 MiB; OpenAI: 8 GB); reserved against the stored-bytes limit from the upload's creation.")
    max_json_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted JSON request body (413 above), checked before it is read.")
    task_queue: str = Field("qlora", description="Celery queue the training tasks go to.")
    task_expires_s: int = Field(3600, ge=10, description="A queued task not taken within this time expires; the sweeper sends it again.")
    lost_message_after_s: float = Field(30.0, gt=0, description="A queued job sent longer ago whose message is no longer in the broker's queue (Redis restarted without persistence) is sent again by the next sweep.")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often a running job writes its heartbeat (and sees a cancel).")
    heartbeat_timeout_s: float = Field(120.0, gt=0, description="A running job whose heartbeat is older is taken as lost.")
    sweep_interval_s: float = Field(30.0, gt=0, description="How often the sweeper looks for lost jobs and expired tasks.")
    job_ended_resend_after_s: float = Field(60.0, ge=0, description="A job's end whose follow-up (qlora.job_ended: the project's next job, webhooks) is still not done this long after its message was sent is sent again by the sweeper.")
    webhook_allowed_networks: str = Field("", description="Comma-separated CIDRs (127.0.0.0/8, 10.1.0.0/16) and host names whose loopback or private addresses webhook URLs may reach; empty (the deployed default): only public addresses. Link-local addresses (169.254.0.0/16, fe80::/10: cloud metadata) are refused whatever this says. `make run` sets 127.0.0.0/8,::1/128.")
    webhook_retry_schedule_s: list[float] = Field([0, 5, 300, 1800, 7200, 18000, 36000, 36000], min_length=1, description="Seconds before each attempt of a webhook delivery, the first counted from the job's end and each next one from the failure before it (Standard Webhooks' schedule); its length is the number of attempts. A JSON list in the environment.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="How long one webhook attempt may take (connect, send, the answer's status line) before it counts as failed.")
    webhook_max_endpoints_per_project: int = Field(10, ge=1, description="Webhook endpoints a project may have (429 quota_exceeded above).")
    webhook_disable_after_failed_deliveries: int = Field(5, ge=1, description="An endpoint whose deliveries used up every attempt this many times in a row is disabled (its reason shown by the API).")
    webhook_disable_after_s: float = Field(5 * 24 * 3600, gt=0, description="An endpoint whose attempts have all failed for this long (since its last success) is disabled at its next failure.")
    webhook_resend_after_s: float = Field(60.0, ge=0, description="A webhook delivery due this long ago whose task message was not taken (lost) is sent again by the sweeper.")
    webhook_countdown_max_s: float = Field(300.0, ge=0, description="A webhook retry due within this many seconds waits as a Celery countdown; a later one waits in the database and the sweeper sends it when due.")
    max_attempts: int = Field(3, ge=1, description="Runs of a job at most (a lost worker's job resumes from its last checkpoint).")
    inference_url: str = Field("", description="The inference backend's base URL (the embedded server or vLLM's OpenAI server), e.g. http://127.0.0.1:8001; empty: chat completions answer 503.")
    inference_timeout_s: float = Field(300.0, gt=0, description="How long the API waits for the inference backend's answer (or its next streamed chunk).")
    inference_max_adapters: int = Field(8, ge=1, description="Embedded inference server: adapters kept attached per base model; the least recently used is dropped first.")
    inference_base_weights: Literal["16bit", "nf4"] = Field("16bit", description="Embedded inference server: serve base models in 16 bits or quantized to 4-bit NF4 (bitsandbytes).")
    inference_max_new_tokens: int = Field(512, ge=1, description="Embedded inference server: tokens generated when a request sets no max_tokens.")
    inference_max_waiting: int = Field(32, ge=1, description="Embedded inference server: requests waiting or generating at once; more get 503 with x-should-retry.")
    inference_max_waiting_per_project: int = Field(16, ge=1, description="Embedded inference server: requests of one project waiting or generating at once (its share of the line); more get 429 rate_limit_exceeded with x-should-retry.")
    inference_max_bases: int = Field(2, ge=1, description="Embedded inference server: base models kept loaded; loading another unloads the least recently used one (and its adapters).")
    inference_cache_max_bytes: int = Field(20 << 30, ge=1, description="Inference backends: bytes of unpacked adapters kept on disk; past it the least recently used ones not attached are deleted.")
    inference_secret: str = Field("", description="The shared secret the API sends to the inference backends (a bearer token; vLLM's --api-key); empty: the one in $QLORA_HOME/inference_secret, generated on first use.")
    chat_max_tokens: int = Field(4096, ge=1, description="Most tokens a chat completion may ask for (max_tokens / max_completion_tokens); more is a 400 naming the parameter.")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="Port of the API process's Prometheus listener (GET /metrics), apart from the API's port so that only the monitoring network reaches it; unset: no metrics served.")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics listener binds (compose: 0.0.0.0 inside the container, the port not published).")
    log_format: Literal["text", "json"] = Field("text", description="Log lines of every process: 'text' (readable) or 'json' (one object a line, with request_id and job_id).")
    outage_retry_s: float = Field(120.0, gt=0, description="How long a running job's writes are retried through a database or storage outage before the run stops and the sweeper takes the job over.")

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        home = self.home.resolve()
        self.home = home
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'qlora.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{home / 'broker.db'}"
        if not self.storage:
            self.storage = "s3" if self.s3_bucket else "local"
        if self.storage_dir is None:
            self.storage_dir = home / "objects"
        if self.models_dir is None:
            self.models_dir = home / "models"
        return self

    @property
    def api_key_file(self) -> Path:
        return self.home / "api_key"

    @property
    def inference_secret_file(self) -> Path:
        return self.home / "inference_secret"

    def inference_secret_value(self) -> str:
        """QLORA_INFERENCE_SECRET, else the secret in $QLORA_HOME/inference_secret, created on first use: the API
        and the backends of one deployment share that directory, so `make run` needs no setting."""
        if self.inference_secret:
            return self.inference_secret
        return write_once(self.inference_secret_file, lambda: secrets.token_urlsafe(32))

    def api_key_map(self) -> dict[str, str]:
        """key -> project. From QLORA_API_KEYS, else the generated key file (project 'default')."""
        raw = self.api_keys
        if not raw.strip() and self.api_key_file.is_file():
            raw = self.api_key_file.read_text().strip()
        keys: dict[str, str] = {}
        for item in raw.split(","):
            item = item.strip()
            if not item:
                continue
            key, _, project = item.partition("=")
            if key.strip():  # "=team" names no key
                keys[key.strip()] = project.strip() or "default"
        return keys


def write_once(path: Path, make: Callable[[], str]) -> str:
    """The content of `path`, created with `make()` if missing: 0600 from the start (mkstemp), published whole by
    link(), and only once when processes race (the loser reads the winner's)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(make() + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    return Settings()
