"""The engine's Sink for the service: events and metrics go to the database, checkpoints to object storage.

Nothing is written for a job once it stopped being this worker's running job (cancelled, or taken as lost
and requeued). Every write is one transaction that starts with the conditional heartbeat UPDATE
(`... WHERE status = 'running' AND worker_id = me`): on PostgreSQL that takes the job's row lock, so a
concurrent cancel is ordered entirely before or after the write; on SQLite the UPDATE makes the transaction
the one writer. If the UPDATE matches no row the transaction is rolled back, an object uploaded for it is
deleted, and `on_lost()` tells the runner to stop the engine.
"""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from contract.metrics import StepMetrics
from core import ids
from core.db import session_scope
from core.jobs import add_event, heartbeat
from core.model_names import checkpoint_model_name, fine_tuned_model_name
from core.storage import ObjectStorage, delete_quietly
from core.tables import Checkpoint, Job, JobMetric, now
from worker.retry import retry_transient

log = logging.getLogger(__name__)

LEVELS = ("info", "warn", "error")


def json_safe(value: Any) -> Any:
    """A value PostgreSQL's JSON type accepts: NaN and infinities (a diverged loss) become null, numpy / torch
    scalars their number, unknown objects their string."""
    return to_jsonable_python(value, inf_nan_mode="null", fallback=_item_or_str)


def _item_or_str(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def pack_directory(directory: Path, archive: Path) -> Path:
    """Write `directory`'s contents to a .tar.gz with its files at the archive root (no leading folder).
    Level 1: adapters and optimizer states are float tensors that gzip barely shrinks; speed matters more."""
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for child in sorted(Path(directory).iterdir()):
            tar.add(child, arcname=child.name)
    return archive


class DatabaseSink:
    """Implements worker.training.sinks.Sink for one job run by one worker."""

    def __init__(self, job_id: str, worker_id: str, session_factory: sessionmaker[Session], storage: ObjectStorage,
                 on_lost: Callable[[], None], *, retry_window_s: float = 120.0, keep_checkpoints: int | None = None):
        self.job_id = job_id
        self.worker_id = worker_id
        self.session_factory = session_factory
        self.storage = storage
        self.on_lost = on_lost
        self.total_steps: int | None = None  # from start(), once the model is loaded
        self.lost = False
        self.retry_window_s = retry_window_s  # how long a write is retried through an outage (worker/retry.py)
        self.keep_checkpoints = keep_checkpoints  # the engine option: older checkpoints are deleted from storage too
        self._model_name: str | None = None
        self._rate_origin: tuple[int, float] | None = None  # (step, time) of this run's first step

    # --- the Sink protocol -----------------------------------------------------------------------------

    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self._write(lambda session: session.execute(update(Job).where(Job.id == self.job_id).values(total_steps=total_steps)
                                                    .execution_options(synchronize_session=False)))

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        level = {"warning": "warn"}.get(level, level)
        if level not in LEVELS:
            level = "info"
        safe = json_safe(data) if data else None
        self._write(lambda session: add_event(session, self.job_id, level, message, data=safe))

    def metrics(self, step: int, metrics: StepMetrics) -> None:
        values = metrics.to_dict()  # the checkpoint object's metrics first; non-finite numbers are None already
        # The step's numbers are stored once, in job_metrics (every reader in the service reads them there); the
        # metrics event repeats them with total_steps because OpenAI's events list carries them (clients, `qlora
        # jobs watch`, read them there).
        data: dict[str, Any] = dict(values)
        if self.total_steps is not None:
            data["total_steps"] = self.total_steps
        message = f"Step {step}/{self.total_steps or '?'}: training loss={_number_or_na(values.get('train_loss'))}"
        if "valid_loss" in values:
            message += f", validation loss={_number_or_na(values['valid_loss'])}"
        estimated_finish = self._estimate_finish(step)

        def write(session: Session) -> None:
            row = session.execute(
                select(JobMetric).where(JobMetric.job_id == self.job_id, JobMetric.step == step)
            ).scalar_one_or_none()
            if row is None:
                session.add(JobMetric(job_id=self.job_id, step=step, values=values, created_at=now()))
            else:  # a resumed run producing a step again
                row.values = values
                row.created_at = now()
            add_event(session, self.job_id, "info", message, type="metrics", data=data)

        # The estimate rides on the transaction's heartbeat UPDATE: one new version of the job row per step, not two.
        self._write(write, job_values={"estimated_finish": estimated_finish} if estimated_finish is not None else None)

    def checkpoint(self, step: int, path: Path, metrics: StepMetrics) -> None:
        if self.lost:
            return
        checkpoint_id = ids.checkpoint_id()
        # The id in the key keeps two runs of one job apart: a stale worker that reaches the same step after the
        # job was resumed elsewhere deletes only its own object, never the one the new run registered.
        key = f"checkpoints/{self.job_id}/step-{step:06d}-{checkpoint_id}.tar.gz"
        fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tar.gz", dir=Path(path).parent)
        os.close(fd)
        archive = Path(name)
        try:
            pack_directory(Path(path), archive)
            retry_transient(lambda: self.storage.put_file(key, archive), self.retry_window_s, f"job {self.job_id}: checkpoint upload")
        finally:
            archive.unlink(missing_ok=True)

        superseded: list[str] = []

        def write(session: Session) -> None:
            model = self._fine_tuned_model(session)
            session.add(Checkpoint(id=checkpoint_id, job_id=self.job_id, step=step, metrics=metrics.checkpoint_metrics(), storage_key=key,
                                   fine_tuned_model_checkpoint=checkpoint_model_name(model, step), created_at=now()))
            add_event(session, self.job_id, "info", f"Checkpoint saved at step {step}")
            superseded[:] = self._forget_old_checkpoints(session)

        if self._write(write, uploaded=key):
            # After the commit: a crash in between orphans objects, never leaves a row pointing at nothing.
            delete_quietly(self.storage, *superseded)

    def _forget_old_checkpoints(self, session: Session) -> list[str]:
        """Delete the rows of this job's checkpoints beyond the newest `keep_checkpoints` (the one just added
        included), in the write's transaction; returns their object keys. The checkpoint this run resumed from
        stays: it is what the job falls back to until a newer one is safely stored, and deleting the object under
        a run still downloading it would fail that run."""
        if self.keep_checkpoints is None:
            return []
        session.flush()
        resume_from = session.execute(select(Job.resume_checkpoint).where(Job.id == self.job_id)).scalar_one()
        rows = session.execute(select(Checkpoint.id, Checkpoint.storage_key).where(Checkpoint.job_id == self.job_id)
                               .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())).all()
        old = [(checkpoint_id, key) for checkpoint_id, key in rows[self.keep_checkpoints:] if checkpoint_id != resume_from]
        if old:
            session.execute(delete(Checkpoint).where(Checkpoint.id.in_([checkpoint_id for checkpoint_id, _ in old])))
        return [key for _, key in old]

    # --- helpers -----------------------------------------------------------------------------------------

    def _write(self, write: Callable[[Session], None], *, uploaded: str | None = None,
               job_values: dict[str, Any] | None = None) -> bool:
        """Run `write` in one transaction, only while the job is still this worker's running job (`job_values` are set
        on the job row by the heartbeat UPDATE that checks it); a transaction that meets a database outage is retried
        whole (worker/retry.py)."""
        if self.lost:
            self._discard(uploaded)
            return False
        try:
            written = retry_transient(lambda: self._transaction(write, job_values or {}), self.retry_window_s,
                                      f"job {self.job_id}: database write")
        except BaseException:
            self._discard(uploaded)
            raise
        if not written:
            self._discard(uploaded)
            self._lose()
        return written

    def _transaction(self, write: Callable[[Session], None], job_values: dict[str, Any]) -> bool:
        with session_scope(self.session_factory) as session:
            # First statement of the transaction: the conditional UPDATE that takes the row lock.
            if not heartbeat(session, self.job_id, self.worker_id, **job_values):
                session.rollback()
                return False
            write(session)
            return True

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            log.warning("job %s is no longer run by %s (cancelled or taken over): writing nothing more", self.job_id, self.worker_id)
        self.on_lost()

    def _discard(self, key: str | None) -> None:
        if key is not None:
            delete_quietly(self.storage, key)

    def _fine_tuned_model(self, session: Session) -> str:
        if self._model_name is None:
            row = session.execute(select(Job.model, Job.project, Job.suffix).where(Job.id == self.job_id)).one()
            self._model_name = fine_tuned_model_name(row.model, row.project, row.suffix, self.job_id)
        return self._model_name

    def _estimate_finish(self, step: int) -> int | None:
        """Unix time the job should finish at, from this run's step rate (model loading excluded)."""
        t = time.time()
        if self._rate_origin is None:
            self._rate_origin = (step, t)
            return None
        first_step, first_t = self._rate_origin
        if self.total_steps is None or step <= first_step or t <= first_t:
            return None
        seconds_per_step = (t - first_t) / (step - first_step)
        return int(t + max(self.total_steps - step, 0) * seconds_per_step)


def _number_or_na(value: Any) -> str:
    """A number to 4 decimals; "n/a" for anything else (a metric the step did not have, or null)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
