"""A job's results: the metrics CSV and the adapter archive uploaded, then their rows and the move to succeeded
committed in one transaction, only while the job is still this worker's."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import ids
from core.db import session_scope
from core.jobs import add_event, succeed_job
from core.model_names import fine_tuned_model_name
from core.storage import ObjectStorage, delete_quietly
from core.tables import File, JobMetric, now
from worker.database_sink import pack_directory
from worker.retry import retry_transient
from worker.runner.inputs import ClaimedJob

log = logging.getLogger(__name__)

CSV_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
CSV_SOURCES = {"train_accuracy": "train_mean_token_accuracy"}
# A dpo job's file adds the reward numbers of each step and of its evaluations (contract/metrics.py, TRL's names
# with '_' for '/'), after OpenAI's columns so that a reader of those finds them where it expects.
REWARD_NAMES = ("rewards_accuracies", "rewards_margins", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected")
DPO_CSV_COLUMNS = CSV_COLUMNS + tuple(f"train_{n}" for n in REWARD_NAMES) + tuple(f"valid_{n}" for n in REWARD_NAMES)


def csv_columns(method: str) -> tuple[str, ...]:
    return DPO_CSV_COLUMNS if method == "dpo" else CSV_COLUMNS


def metrics_csv(session_factory: sessionmaker[Session], job_id: str, path: Path, method: str = "supervised") -> Path:
    """OpenAI's result file: one row a step, empty cells where a metric is absent."""
    with session_scope(session_factory) as session:
        rows = session.execute(select(JobMetric.step, JobMetric.values).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
    columns = csv_columns(method)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for step, values in rows:
            cells: list[Any] = [step]
            for column in columns[1:]:
                value = values.get(CSV_SOURCES.get(column, column))
                cells.append("" if value is None else value)
            writer.writerow(cells)
    return path


def store_results(spec: ClaimedJob, worker_id: str, session_factory: sessionmaker[Session], storage: ObjectStorage,
                   workdir: Path, adapter_dir: Path, trained_tokens: int, retry_window_s: float) -> bool:
    """Upload the adapter and the metrics CSV, then in one transaction (only if the job is still ours) add their
    File rows and move the job to succeeded. If the job was cancelled meanwhile, delete the objects. Each upload
    and the transaction are retried through an outage (worker/retry.py). Returns whether the results were committed."""
    method = str(spec.training_config.get("method", "supervised"))
    csv_path = retry_transient(lambda: metrics_csv(session_factory, spec.id, workdir / "metrics.csv", method), retry_window_s,
                               f"job {spec.id}: metrics")
    uploads: list[tuple[str, str, Path]] = [
        (ids.file_id(), f"{spec.id}-metrics.csv", csv_path),
        (ids.file_id(), f"{spec.id}-adapter.tar.gz", pack_directory(adapter_dir, workdir / "adapter.tar.gz")),
    ]
    stored: list[tuple[str, str, Any]] = []
    try:
        for file_id, filename, path in uploads:
            obj = retry_transient(lambda f=file_id, p=path: storage.put_file(f"files/{f}", p), retry_window_s, f"job {spec.id}: result upload")
            stored.append((file_id, filename, obj))
        committed = retry_transient(lambda: commit_results(spec, worker_id, session_factory, stored, trained_tokens), retry_window_s,
                            f"job {spec.id}: result commit")
    except BaseException:
        delete_quietly(storage, *(obj.key for _, _, obj in stored))
        raise
    if not committed:
        delete_quietly(storage, *(obj.key for _, _, obj in stored))
        log.info("job %s finished training but is no longer ours: results discarded", spec.id)
        return False
    return True


def commit_results(spec: ClaimedJob, worker_id: str, session_factory: sessionmaker[Session], stored: list[tuple[str, str, Any]],
                    trained_tokens: int) -> bool:
    """The result files' rows and the move to succeeded, in one transaction; False if the job is no longer ours."""
    with session_scope(session_factory) as session:
        model = fine_tuned_model_name(spec.base_model, spec.project, spec.suffix, spec.id)
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

