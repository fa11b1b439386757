"""Rows and objects for worker tests: a project, a JSONL file in storage, a job as the API would create it."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from contract.options import TrainingConfig
from core import ids
from core.db import session_scope
from core.storage import ObjectStorage
from core.tables import Checkpoint, File, Job, JobEvent, JobMetric, Project, now

PROJECT = "proj-test"
MODEL = "tiny-llama"


def chat_lines(n: int) -> list[str]:
    return [json.dumps({"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]})
            for i in range(n)]


def ensure_project(session: Session, name: str = PROJECT) -> None:
    if session.get(Project, name) is None:
        session.add(Project(name=name, created_at=now()))
        session.flush()


def put_jsonl(session_factory: sessionmaker[Session], storage: ObjectStorage, lines: list[str], *,
              filename: str = "train.jsonl", project: str = PROJECT) -> str:
    """Store `lines` as an uploaded fine-tune file (object + File row); returns the file id."""
    file_id = ids.file_id()
    key = f"files/{file_id}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_text("".join(line + "\n" for line in lines))
        stored = storage.put_file(key, path)
    with session_scope(session_factory) as session:
        ensure_project(session, project)
        session.add(File(id=file_id, project=project, filename=filename, purpose="fine-tune", bytes=stored.size,
                         sha256=stored.sha256, status="processed", storage_key=key, created_at=now()))
    return file_id


def stored_config(**options: Any) -> dict[str, Any]:
    """What the API stores as a job's `training_config`: every option resolved."""
    defaults: dict[str, Any] = dict(max_steps=4, batch_size=2, micro_batch_size=2, checkpoint_every=2, max_seq_length=64,
                                    lora_r=4, learning_rate=1e-3, warmup_ratio=0.0)
    cfg = TrainingConfig(**{**defaults, **options})
    return cfg.resolved()


def create_job(session_factory: sessionmaker[Session], storage: ObjectStorage | None = None, *, training_file: str | None = None,
               validation_file: str | None = None, hyper: dict[str, Any] | None = None, status: str = "queued",
               n_examples: int = 12, suffix: str | None = "unit", model: str = MODEL, **fields: Any) -> str:
    """A job row as the API creates it (queued), with a training file put in storage unless one is given."""
    if training_file is None:
        assert storage is not None
        training_file = put_jsonl(session_factory, storage, chat_lines(n_examples))
    hyper = hyper if hyper is not None else stored_config()
    job_id = ids.job_id()
    with session_scope(session_factory) as session:
        ensure_project(session)
        session.add(Job(id=job_id, project=PROJECT, model=model, training_file=training_file, validation_file=validation_file,
                        hyperparameters={}, training_config=hyper, suffix=suffix, status=status, result_files=[],
                        created_at=now(), **fields))
    return job_id


def get_job(session_factory: sessionmaker[Session], job_id: str) -> Job:
    with session_scope(session_factory) as session:
        return session.execute(select(Job).where(Job.id == job_id)).scalar_one()


def counts(session_factory: sessionmaker[Session], job_id: str) -> dict[str, int]:
    with session_scope(session_factory) as session:
        return {name: session.execute(select(func.count()).select_from(model).where(model.job_id == job_id)).scalar_one()
                for name, model in (("events", JobEvent), ("metrics", JobMetric), ("checkpoints", Checkpoint))}


def events(session_factory: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with session_scope(session_factory) as session:
        return list(session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).scalars())


def metric_steps(session_factory: sessionmaker[Session], job_id: str) -> list[int]:
    with session_scope(session_factory) as session:
        return list(session.execute(select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).scalars())


def checkpoints(session_factory: sessionmaker[Session], job_id: str) -> list[Checkpoint]:
    with session_scope(session_factory) as session:
        return list(session.execute(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).scalars())


def local_objects(root: Path) -> set[str]:
    """Keys of the complete objects under a LocalStorage root."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.endswith(".partial")}


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, message: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{message} not reached within {timeout_s} s")
