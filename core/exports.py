"""Merged exports: the moves of an export row.

An export goes queued -> running -> succeeded | failed. As with jobs, every move is one conditional UPDATE, so a
redelivered task cannot run an export twice and a worker that lost its export writes nothing. A running export's
worker holds its lease (core/leases.py, as for jobs); the sweeper fails one whose heartbeat stopped
(`worker_lost`), so that a new POST can start another. The caller commits.
"""

from __future__ import annotations

import time
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.jobs import add_event
from core.leases import lapsed, taken
from core.tables import Export, now


class ExportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


ACTIVE = (ExportStatus.QUEUED.value, ExportStatus.RUNNING.value)


def mark_export_enqueued(session: Session, export_id: str) -> None:
    session.execute(update(Export).where(Export.id == export_id).values(enqueued_at=time.time()))


def claim_export(session: Session, export_id: str, worker_id: str) -> bool:
    """queued -> running; only one claim succeeds."""
    result = session.execute(
        update(Export).where(Export.id == export_id, Export.status == ExportStatus.QUEUED.value)
        .values(status=ExportStatus.RUNNING.value, started_at=now(), **taken(worker_id))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def fail_lost_exports(session: Session, *, heartbeat_timeout_s: float, at: float | None = None) -> list[str]:
    """Fail the running exports whose heartbeat is older than `heartbeat_timeout_s` at Unix time `at` (their worker
    died), with an error event on the job. An export is not resumed: merging again from the start is what a new
    POST does."""
    still_stale = lapsed(Export, heartbeat_timeout_s=heartbeat_timeout_s, at=at)
    stale = session.execute(select(Export.id, Export.job_id).where(still_stale)).all()
    message = "The worker running this export stopped responding."
    failed = []
    for export_id, job_id in stale:
        moved = session.execute(
            update(Export).where(Export.id == export_id, still_stale)
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


def expired_queued_exports(session: Session, *, expires_s: float, at: float | None = None) -> list[str]:
    """Queued exports whose task expired before a worker took it, by Unix time `at` (now by default). Those never
    sent wait their project's turn (core/dispatch.py)."""
    cutoff = (time.time() if at is None else at) - expires_s
    return list(session.execute(
        select(Export.id).where(Export.status == ExportStatus.QUEUED.value, Export.enqueued_at < cutoff)
    ).scalars())
