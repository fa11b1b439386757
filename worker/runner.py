"""Runs one fine-tuning job on this worker: claim, fetch inputs, train with a heartbeat, store results.

    run_job(job_id, settings, session_factory, storage) -> outcome

The job row is the truth. A worker that cannot claim the row (cancelled, already running elsewhere,
finished) does nothing. While the engine trains, a heartbeat thread keeps the claim alive; when the heartbeat
finds the job is no longer ours (cancelled, or requeued by the sweeper after we looked dead) it sets the stop
flag the engine polls between micro-batches, and from then on nothing more is written for the job. The final
result (result files and the `succeeded` move) is one transaction that commits only if we still own the job.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import shutil
import socket
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from contract.data_format import DataValidationError
from contract.options import ConfigError, TrainingConfig
from core import ids
from core.db import session_scope
from core.jobs import (
    add_event,
    claim_job,
    fail_job,
    fine_tuned_model_name,
    heartbeat,
    record_resolved_options,
    succeed_job,
)
from core.models import Checkpoint, File, Job, JobMetric, now
from core.settings import Settings
from core.storage import ObjectNotFound, ObjectStorage, delete_quietly
from worker.retry import Outage, outlast
from worker.sink import DatabaseSink, pack_directory
from worker.training.checkpoint import CheckpointError
from worker.training.model import pick_device, resolve_compute_dtype
from worker.training.trainer import NonFiniteLossError, TrainingJob, train

log = logging.getLogger(__name__)

# Outcomes of run_job.
NOT_CLAIMED = "not_claimed"  # the job was not queued (cancelled, running elsewhere, finished): nothing done
SUCCEEDED = "succeeded"
FAILED = "failed"
STOPPED = "stopped"  # the job stopped being ours (cancelled or taken over) while we ran it: nothing more written

CSV_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
CSV_SOURCES = {"train_accuracy": "train_mean_token_accuracy"}


def default_worker_id(tag: str | None = None) -> str:
    """Unique per run: a claim is owned by one run, so a redelivered task in the same process is another owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{tag or secrets.token_hex(4)}"


@dataclass(frozen=True)
class JobSpec:
    """What the run needs from the rows, read once after the claim."""

    id: str
    project: str
    model: str
    suffix: str | None
    attempt: int
    training_config: dict[str, Any]
    training_key: str
    validation_key: str | None
    resume_key: str | None
    resume_step: int | None


class JobFailure(Exception):
    """A failure with an OpenAI-style error (code, message, param)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class Heartbeat(threading.Thread):
    """Writes the job's heartbeat every `interval_s`; calls `on_lost` (once) when the job is no longer ours."""

    def __init__(self, job_id: str, worker_id: str, session_factory: sessionmaker[Session], interval_s: float,
                 on_lost: Callable[[], None]):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.worker_id, self.session_factory = job_id, worker_id, session_factory
        self.interval_s, self.on_lost = interval_s, on_lost
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                with session_scope(self.session_factory) as session:
                    alive = heartbeat(session, self.job_id, self.worker_id)
            except Exception:
                # A database blip: keep trying. If it lasts, the sweeper takes the job as lost and our next
                # successful heartbeat finds it is no longer ours.
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)
                continue
            if not alive:
                log.warning("job %s is no longer run by %s (cancelled or taken over): stopping", self.job_id, self.worker_id)
                self.on_lost()
                return

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(timeout=max(30.0, 2 * self.interval_s))


def run_job(job_id: str, settings: Settings, session_factory: sessionmaker[Session], storage: ObjectStorage,
            worker_id: str | None = None) -> str:
    """Run job `job_id` to its end on this worker. Returns one of NOT_CLAIMED, SUCCEEDED, FAILED, STOPPED."""
    worker_id = worker_id or default_worker_id()
    with session_scope(session_factory) as session:
        if not claim_job(session, job_id, worker_id):
            log.info("job %s not claimed by %s: it is not queued", job_id, worker_id)
            return NOT_CLAIMED
        attempt = session.execute(select(Job.attempt).where(Job.id == job_id)).scalar_one()
        add_event(session, job_id, "info", "Fine-tuning job started" if attempt == 1 else f"Fine-tuning job started (attempt {attempt})")
    log.info("job %s claimed by %s (attempt %d)", job_id, worker_id, attempt)

    stop = threading.Event()
    beat = Heartbeat(job_id, worker_id, session_factory, settings.heartbeat_interval_s, on_lost=stop.set)
    beat.start()
    remove_dead_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"qlora-{job_id}-{os.getpid()}-"))
    try:
        outcome = _run_claimed(job_id, worker_id, settings, session_factory, storage, workdir, stop)
    except Outage as exc:
        # Not the job's fault: leave it running with a heartbeat that goes stale, for the sweeper to resume.
        log.warning("job %s stops on an outage (%s); the sweeper resumes it from its last checkpoint", job_id, exc)
        outcome = STOPPED
    except Exception as exc:
        code, message, param = _error_of(exc)
        if isinstance(exc, JobFailure):
            log.warning("job %s failed: %s", job_id, message)
        else:
            log.exception("job %s failed", job_id)
        with session_scope(session_factory) as session:
            moved = fail_job(session, job_id, code=code, message=message, param=param, worker_id=worker_id)
        outcome = FAILED if moved else STOPPED
    finally:
        beat.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("job %s on %s: %s", job_id, worker_id, outcome)
    return outcome


def remove_dead_workdirs(tmp: Path | None = None) -> list[Path]:
    """Remove the work directories (inputs, checkpoints, merged models: gigabytes) that killed workers left behind:
    those whose process, named in the directory (qlora-JOB-PID-..., qlora-export-TOKEN-PID-...), no longer runs.
    Returns what was removed."""
    removed = []
    root = Path(tmp or tempfile.gettempdir())
    for path in [*root.glob("qlora-ftjob-*-*-*"), *root.glob("qlora-export-*-*-*")]:  # jobs' and merged exports' (worker/export.py)
        pid = path.name.split("-")[3]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:  # alive, another user's
            pass
    return removed


def _run_claimed(job_id: str, worker_id: str, settings: Settings, session_factory: sessionmaker[Session],
                 storage: ObjectStorage, workdir: Path, stop: threading.Event) -> str:
    spec = _load_spec(session_factory, job_id)
    config = TrainingConfig.from_dict(spec.training_config)  # the row's resolved options, as the API accepted them
    if config.compute_dtype == "auto":
        # Decided once, on the machine that first runs the job, and stored: a resumed run keeps the same dtype.
        # Only the dtype: lean_activations stays 'auto', decided by each run for its own device.
        config = config.model_copy(update={"compute_dtype": resolve_compute_dtype("auto", pick_device())})
        with session_scope(session_factory) as session:
            record_resolved_options(session, job_id, worker_id, {"compute_dtype": config.compute_dtype})
    assert settings.models_dir is not None
    # Lexically inside models_dir (a model directory may be a symlink to shared storage, so no resolve()).
    models_dir = Path(os.path.normpath(settings.models_dir.absolute()))
    base_model_dir = Path(os.path.normpath(models_dir / spec.model))
    if models_dir not in base_model_dir.parents:
        raise JobFailure("model_not_found", f"Model {spec.model!r} is not a model directory of this service", "model")

    window = settings.outage_retry_s
    train_path = _download(storage, spec.training_key, workdir / "train.jsonl", "training_file", window)
    valid_path = _download(storage, spec.validation_key, workdir / "validation.jsonl", "validation_file", window) if spec.validation_key else None
    resume_from = None
    if spec.resume_key is not None:
        archive = _download(storage, spec.resume_key, workdir / "resume.tar.gz", None, window)
        resume_from = unpack_archive(archive, workdir / "resume")
        archive.unlink()
        log.info("job %s resumes from the checkpoint at step %s", job_id, spec.resume_step)

    sink = DatabaseSink(job_id, worker_id, session_factory, storage, on_lost=stop.set, retry_window_s=settings.outage_retry_s)
    job = TrainingJob(base_model_dir=base_model_dir, train_file=train_path, output_dir=workdir / "output",
                      config=config, validation_file=valid_path)
    deadline = time.monotonic() + settings.max_job_seconds
    try:
        result = train(job, sink, should_stop=lambda: stop.is_set() or time.monotonic() > deadline, resume_from=resume_from)
    except DataValidationError as exc:
        raise JobFailure(f"invalid_{exc.role}_file", exc.message, f"{exc.role}_file") from exc
    if result.status != "succeeded" and not stop.is_set() and time.monotonic() > deadline:
        raise JobFailure("job_timeout", f"The job ran longer than {settings.max_job_seconds:.0f} s (QLORA_MAX_JOB_SECONDS) and was "
                         f"stopped at step {result.steps} of {result.total_steps}.")
    if result.status != "succeeded" or stop.is_set():
        log.info("job %s stopped at step %d: no longer ours", job_id, result.steps)
        return STOPPED
    assert result.adapter_dir is not None
    return _store_results(spec, worker_id, session_factory, storage, workdir, result.adapter_dir, result.trained_tokens,
                          settings.outage_retry_s)


def _load_spec(session_factory: sessionmaker[Session], job_id: str) -> JobSpec:
    with session_scope(session_factory) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        files = {f.id: f for f in session.execute(
            select(File).where(File.id.in_([job.training_file, *([job.validation_file] if job.validation_file else [])]))
        ).scalars()}
        training = files.get(job.training_file)
        if training is None:
            raise JobFailure("invalid_training_file", f"Training file {job.training_file} does not exist", "training_file")
        validation_key = None
        if job.validation_file:
            if job.validation_file not in files:
                raise JobFailure("invalid_validation_file", f"Validation file {job.validation_file} does not exist", "validation_file")
            validation_key = files[job.validation_file].storage_key
        resume_key = resume_step = None
        if job.resume_checkpoint:
            checkpoint = session.execute(select(Checkpoint).where(Checkpoint.id == job.resume_checkpoint)).scalar_one_or_none()
            if checkpoint is None:
                raise JobFailure("checkpoint_error", f"Checkpoint {job.resume_checkpoint} to resume from does not exist")
            resume_key, resume_step = checkpoint.storage_key, checkpoint.step
        return JobSpec(id=job.id, project=job.project, model=job.model, suffix=job.suffix, attempt=job.attempt,
                       training_config=dict(job.training_config), training_key=training.storage_key,
                       validation_key=validation_key, resume_key=resume_key, resume_step=resume_step)


def _download(storage: ObjectStorage, key: str, path: Path, param: str | None, retry_window_s: float) -> Path:
    try:
        outlast(lambda: storage.download(key, path), retry_window_s, f"download of {key}")
    except ObjectNotFound:
        what = {"training_file": "Training file", "validation_file": "Validation file"}.get(param or "", "Checkpoint")
        code = f"invalid_{param}" if param else "checkpoint_error"
        raise JobFailure(code, f"{what} content is missing from storage (object {key})", param) from None
    return path


def unpack_archive(archive: Path, target: Path) -> Path:
    """Unpack a .tar.gz we wrote; the 'data' filter refuses absolute paths, '..', links out and devices."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")
    return target


def _error_of(exc: Exception) -> tuple[str, str, str | None]:
    if isinstance(exc, JobFailure):
        return exc.code, exc.message, exc.param
    if isinstance(exc, ConfigError):
        return exc.code, exc.message, exc.param
    if isinstance(exc, NonFiniteLossError):
        return "non_finite_loss", f"Training stopped: {exc}", None
    if isinstance(exc, CheckpointError):
        return "checkpoint_error", f"Cannot resume from the checkpoint: {exc}", None
    return "training_error", f"Training failed: {type(exc).__name__}: {exc}", None


def metrics_csv(session_factory: sessionmaker[Session], job_id: str, path: Path) -> Path:
    """OpenAI's result file: one row a step, empty cells where a metric is absent."""
    with session_scope(session_factory) as session:
        rows = session.execute(select(JobMetric.step, JobMetric.values).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for step, values in rows:
            cells: list[Any] = [step]
            for column in CSV_COLUMNS[1:]:
                value = values.get(CSV_SOURCES.get(column, column))
                cells.append("" if value is None else value)
            writer.writerow(cells)
    return path


def _store_results(spec: JobSpec, worker_id: str, session_factory: sessionmaker[Session], storage: ObjectStorage,
                   workdir: Path, adapter_dir: Path, trained_tokens: int, retry_window_s: float) -> str:
    """Upload the adapter and the metrics CSV, then in one transaction (only if the job is still ours) add their
    File rows and move the job to succeeded. If the job was cancelled meanwhile, delete the objects. Each upload
    and the transaction are retried through an outage (worker/retry.py)."""
    csv_path = outlast(lambda: metrics_csv(session_factory, spec.id, workdir / "metrics.csv"), retry_window_s, f"job {spec.id}: metrics")
    uploads: list[tuple[str, str, Path]] = [
        (ids.file_id(), f"{spec.id}-metrics.csv", csv_path),
        (ids.file_id(), f"{spec.id}-adapter.tar.gz", pack_directory(adapter_dir, workdir / "adapter.tar.gz")),
    ]
    stored: list[tuple[str, str, Any]] = []
    try:
        for file_id, filename, path in uploads:
            obj = outlast(lambda f=file_id, p=path: storage.put_file(f"files/{f}", p), retry_window_s, f"job {spec.id}: result upload")
            stored.append((file_id, filename, obj))
        committed = outlast(lambda: _commit_results(spec, worker_id, session_factory, stored, trained_tokens), retry_window_s,
                            f"job {spec.id}: result commit")
    except BaseException:
        delete_quietly(storage, *(obj.key for _, _, obj in stored))
        raise
    if not committed:
        delete_quietly(storage, *(obj.key for _, _, obj in stored))
        log.info("job %s finished training but is no longer ours: results discarded", spec.id)
        return STOPPED
    return SUCCEEDED


def _commit_results(spec: JobSpec, worker_id: str, session_factory: sessionmaker[Session], stored: list[tuple[str, str, Any]],
                    trained_tokens: int) -> bool:
    """The result files' rows and the move to succeeded, in one transaction; False if the job is no longer ours."""
    with session_scope(session_factory) as session:
        model = fine_tuned_model_name(spec.model, spec.project, spec.suffix, spec.id)
        # The conditional UPDATE comes first: it takes the row lock, so a cancel lands wholly before or after.
        if not succeed_job(session, spec.id, worker_id, fine_tuned_model=model, trained_tokens=trained_tokens,
                           result_files=[file_id for file_id, _, _ in stored]):
            session.rollback()
            return False
        for file_id, filename, obj in stored:
            session.add(File(id=file_id, project=spec.project, filename=filename, purpose="fine-tune-results", bytes=obj.size,
                             sha256=obj.sha256, status="processed", storage_key=obj.key, created_at=now()))
        add_event(session, spec.id, "info", "The job has successfully completed")
        return True

