"""Runs one fine-tuning job on this worker: claim, fetch inputs, train with a heartbeat, store results.

    run_job(job_id, settings, session_factory, storage) -> outcome

The job row is the truth. A worker that cannot claim the row (cancelled, already running elsewhere,
finished) does nothing. While the engine trains, a heartbeat thread keeps the claim alive; when the heartbeat
finds the job is no longer ours (cancelled, or requeued by the sweeper after we looked dead) it sets the stop
flag the engine polls between micro-batches, and from then on nothing more is written for the job. The final
result (result files and the `succeeded` move) is one transaction that commits only if we still own the job.

Split by job: `claim` (the worker id and the heartbeat thread), `inputs` (what the run reads from the rows, the
downloads), `results` (the metrics CSV, the uploads and the final commit); this module runs them in order.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from contract.data_format import DataValidationError
from contract.options import ConfigError, TrainingConfig
from core import logs
from core.db import session_scope
from core.jobs import add_event, claim_job, fail_job, pause_running_job, record_resolved_options, recover_lost_run
from core.settings import Settings
from core.storage import ObjectStorage
from core.tables import Checkpoint, Job
from worker.database_sink import DatabaseSink
from worker.retry import Outage
from worker.runner.claim import Heartbeat, default_worker_id
from worker.runner.gpus import LaunchCrashed, train_on_gpus
from worker.runner.inputs import JobFailure, download, load_spec, unpack_archive
from worker.runner.results import store_results
from worker.training.checkpoint import CheckpointError
from worker.training.model import decide_for_device, pick_device
from worker.training.trainer import NonFiniteLossError, TrainingRequest, train

__all__ = ["FAILED", "NOT_CLAIMED", "STOPPED", "SUCCEEDED", "JobFailure", "default_worker_id", "remove_dead_workdirs",
           "run_job", "unpack_archive"]

log = logging.getLogger(__name__)

# Outcomes of run_job.
NOT_CLAIMED = "not_claimed"  # the job was not queued (cancelled, running elsewhere, finished): nothing done
SUCCEEDED = "succeeded"
FAILED = "failed"
STOPPED = "stopped"  # the job stopped being ours (cancelled or taken over) while we ran it: nothing more written
PAUSED = "paused"  # paused on request after a step, with a checkpoint to resume from; the worker is free


def run_job(job_id: str, settings: Settings, session_factory: sessionmaker[Session], storage: ObjectStorage,
            worker_id: str | None = None, dispatch_next: Callable[[str], object] | None = None) -> str:
    """Run job `job_id` to its end on this worker. Returns one of NOT_CLAIMED, SUCCEEDED, FAILED, STOPPED.
    `dispatch_next(project)` is called once the job is claimed, so that the project's next queued job is sent
    (core/dispatch.py); what follows the job's end is core/job_events.py's, announced by the commit that ends it."""
    with logs.bound(job_id=job_id):  # every line logged meanwhile carries the job's id
        return _run_job(job_id, settings, session_factory, storage, worker_id or default_worker_id(), dispatch_next)


def _run_job(job_id: str, settings: Settings, session_factory: sessionmaker[Session], storage: ObjectStorage, worker_id: str,
             dispatch_next: Callable[[str], object] | None) -> str:
    with session_scope(session_factory) as session:
        if not claim_job(session, job_id, worker_id):
            log.info("job %s not claimed by %s: it is not queued", job_id, worker_id)
            return NOT_CLAIMED
        attempt, project = session.execute(select(Job.attempt, Job.project).where(Job.id == job_id)).one()
        add_event(session, job_id, "info", "Fine-tuning job started" if attempt == 1 else f"Fine-tuning job started (attempt {attempt})")
    log.info("job %s claimed by %s (attempt %d)", job_id, worker_id, attempt)
    if dispatch_next is not None:
        dispatch_next(project)

    stop = threading.Event()
    beat = Heartbeat(Job, job_id, worker_id, session_factory, settings.heartbeat_interval_s, on_lost=stop.set)
    beat.start()
    remove_dead_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"qlora-{job_id}-{os.getpid()}-"))
    try:
        outcome = _run_claimed(job_id, worker_id, settings, session_factory, storage, workdir, stop)
    except LaunchCrashed as exc:
        # A rank died while this runner lives: what the sweeper does for a dead worker, done now.
        log.warning("job %s: its launch crashed at step %d (%s)", job_id, exc.steps, exc)
        with session_scope(session_factory) as session:
            recovered = recover_lost_run(session, job_id, max_attempts=settings.max_attempts, guard={"owner": worker_id},
                                         cause=f"a training process crashed ({exc})", error_code="training_error",
                                         enqueued_at=None)  # unsent: dispatch sends it
        if recovered == "requeued" and dispatch_next is not None:
            dispatch_next(project)
        outcome = FAILED if recovered == "failed" else PAUSED if recovered == "paused" else STOPPED
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
    spec = load_spec(session_factory, job_id)
    config = TrainingConfig.from_dict(spec.training_config)  # the row's resolved options, as the API accepted them
    if config.n_gpus > settings.worker_gpus:
        raise JobFailure("insufficient_gpus", f"The job asks for {config.n_gpus} GPUs and this worker owns {settings.worker_gpus} "
                         "(QLORA_WORKER_GPUS): it was sent to a queue this worker should not serve (docs/operations.md, Several GPUs).",
                         "hyperparameters.n_gpus")
    if config.compute_dtype == "auto" and config.n_gpus == 1:
        # Decided once, on the machine that first runs the job, and stored: a resumed run keeps the same dtype.
        # Only the dtype: the other 'auto' options stay so, decided by each run for its own device (docs/training.md).
        config = config.model_copy(update={"compute_dtype": decide_for_device(config, pick_device()).compute_dtype})
        with session_scope(session_factory) as session:
            record_resolved_options(session, job_id, worker_id, {"compute_dtype": config.compute_dtype})
    assert settings.models_dir is not None
    # Lexically inside models_dir (a model directory may be a symlink to shared storage, so no resolve()).
    models_dir = Path(os.path.normpath(settings.models_dir.absolute()))
    base_model_dir = Path(os.path.normpath(models_dir / spec.base_model))
    if models_dir not in base_model_dir.parents:
        raise JobFailure("model_not_found", f"Model {spec.base_model!r} is not a model directory of this service", "model")

    window = settings.outage_retry_s
    train_path = download(storage, spec.training_key, workdir / "train.jsonl", "training_file", window)
    valid_path = download(storage, spec.validation_key, workdir / "validation.jsonl", "validation_file", window) if spec.validation_key else None
    resume_from = None
    if spec.resume_key is not None:
        archive = download(storage, spec.resume_key, workdir / "resume.tar.gz", None, window)
        resume_from = unpack_archive(archive, workdir / "resume")
        archive.unlink()
        log.info("job %s resumes from the checkpoint at step %s", job_id, spec.resume_step)
    initial_adapter = None
    if spec.source_key is not None:  # a copy of the source's adapter, unpacked here: its stored archive stays as it is
        archive = download(storage, spec.source_key, workdir / "source.tar.gz", "model", window)
        initial_adapter = unpack_archive(archive, workdir / "source")
        archive.unlink()
        log.info("job %s starts from the adapter of %s", job_id, spec.model)

    sink = DatabaseSink(job_id, worker_id, session_factory, storage, on_lost=stop.set, retry_window_s=settings.outage_retry_s,
                        keep_checkpoints=config.keep_checkpoints)
    job = TrainingRequest(base_model_dir=base_model_dir, train_file=train_path, output_dir=workdir / "output",
                          config=config, validation_file=valid_path, initial_adapter=initial_adapter)
    deadline = time.monotonic() + settings.max_job_seconds
    pause = PauseWatch(session_factory, job_id, settings.heartbeat_interval_s)
    should_stop = lambda: stop.is_set() or time.monotonic() > deadline  # noqa: E731
    try:
        if config.n_gpus > 1:
            # Several GPUs: torchrun's processes train, rank 0 reports here (worker/runner/gpus.py); each rank decides
            # compute_dtype 'auto' on its own GPU (never this process: no CUDA context here) and rank 0's is recorded.
            def record(options: dict) -> None:
                with session_scope(session_factory) as session:
                    record_resolved_options(session, job_id, worker_id, options)

            result = train_on_gpus(job, config.n_gpus, sink, workdir, should_stop=should_stop, should_pause=pause,
                                   resume_from=resume_from, record_resolved=record)
        else:
            result = train(job, sink, should_stop=should_stop, resume_from=resume_from, should_pause=pause)
    except DataValidationError as exc:
        raise JobFailure(f"invalid_{exc.role}_file", exc.message, f"{exc.role}_file") from exc
    if result.status != "succeeded" and not stop.is_set() and time.monotonic() > deadline:
        raise JobFailure("job_timeout", f"The job ran longer than {settings.max_job_seconds:.0f} s (QLORA_MAX_JOB_SECONDS) and was "
                         f"stopped at step {result.steps} of {result.total_steps}.")
    if result.status != "succeeded" and pause.requested and not stop.is_set():
        with session_scope(session_factory) as session:
            newest = session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1))
            if newest is not None and pause_running_job(session, job_id, worker_id, newest):
                log.info("job %s paused at step %d", job_id, result.steps)
                return PAUSED
    if result.status != "succeeded" or stop.is_set():
        log.info("job %s stopped at step %d: no longer ours", job_id, result.steps)
        return STOPPED
    assert result.adapter_dir is not None
    committed = store_results(spec, worker_id, session_factory, storage, workdir, result.adapter_dir, result.trained_tokens,
                              settings.outage_retry_s)
    return SUCCEEDED if committed else STOPPED


class PauseWatch:
    """Whether the job was asked to pause (POST .../pause marks its row), read at most every `interval_s` seconds:
    the engine asks after every step."""

    def __init__(self, session_factory: sessionmaker[Session], job_id: str, interval_s: float):
        self.session_factory, self.job_id, self.interval_s = session_factory, job_id, interval_s
        self.requested = False
        self._next_read = 0.0

    def __call__(self) -> bool:
        if not self.requested and time.monotonic() >= self._next_read:
            self._next_read = time.monotonic() + self.interval_s
            try:
                with session_scope(self.session_factory) as session:
                    marked = session.scalar(select(Job.pause_requested_at).where(Job.id == self.job_id))
                self.requested = marked is not None
            except Exception:  # a database blip: asked again after the next step
                log.warning("could not read whether job %s should pause", self.job_id, exc_info=True)
        return self.requested


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
