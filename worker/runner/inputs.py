"""A job's inputs: what the run needs from the rows (`ClaimedJob`) and the files it downloads and unpacks."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.db import session_scope
from core.fine_tuned_models import find_usable_adapter
from core.storage import ObjectNotFound, ObjectStorage
from core.tables import Checkpoint, File, Job
from worker.retry import retry_transient


@dataclass(frozen=True)
class ClaimedJob:
    """What the run needs from the rows, read once after the claim."""

    id: str
    project: str
    model: str  # as the request named it
    base_model: str  # the base directory the adapter trains on
    suffix: str | None
    attempt: int
    training_config: dict[str, Any]
    training_key: str
    validation_key: str | None
    resume_key: str | None
    resume_step: int | None
    # The adapter archive of the fine-tuned model the job continues from: its initial weights. None for a job on a
    # base, and for a resumed one (its checkpoint holds its own weights).
    source_key: str | None = None


class JobFailure(Exception):
    """A failure with an OpenAI-style error (code, message, param)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def load_spec(session_factory: sessionmaker[Session], job_id: str) -> ClaimedJob:
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
        source_key = None
        if job.continues is not None and resume_key is None:
            # Checked again at the claim, as at creation: a revoked grant or a deleted model stops a job that has not
            # started from it yet. A job with a checkpoint of its own (paused, or taken over) trains on its own weights.
            source = find_usable_adapter(session, job.project, job.continues)
            if source is None:
                raise JobFailure("model_not_found", f"The model {job.continues} this job continues from was deleted, or is no longer "
                                 f"granted to project {job.project}.", "model")
            source_key = source.storage_key
        return ClaimedJob(id=job.id, project=job.project, model=job.model, base_model=job.trained_base, suffix=job.suffix,
                          attempt=job.attempt, training_config=dict(job.training_config), training_key=training.storage_key,
                          validation_key=validation_key, resume_key=resume_key, resume_step=resume_step, source_key=source_key)


def download(storage: ObjectStorage, key: str, path: Path, param: str | None, retry_window_s: float) -> Path:
    try:
        retry_transient(lambda: storage.download(key, path), retry_window_s, f"download of {key}")
    except ObjectNotFound:
        what = {"training_file": "Training file", "validation_file": "Validation file",
                "model": "The adapter of the model the job continues from: its"}.get(param or "", "Checkpoint")
        code = "model_not_found" if param == "model" else f"invalid_{param}" if param else "checkpoint_error"
        raise JobFailure(code, f"{what} content is missing from storage (object {key})", param) from None
    return path


def unpack_archive(archive: Path, target: Path) -> Path:
    """Unpack a .tar.gz we wrote; the 'data' filter refuses absolute paths, '..', links out and devices."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")
    return target
