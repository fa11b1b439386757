"""A running row's lease, the one mechanism for jobs and merged exports: the worker that claimed the row owns it
(`worker_id`) while it renews `heartbeat_at`; the sweeper takes a row whose heartbeat lapsed as lost.

A lease is held on a row of a table with `id`, `status`, `worker_id` and `heartbeat_at` columns (`Job`, `Export`).
Renewing is one conditional UPDATE (`... WHERE status = 'running' AND worker_id = me`): it fails once the row was
cancelled, failed or taken over, which is how a worker learns that it must stop. The caller commits.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from core.tables import Export, Job

RUNNING = "running"  # the status both tables hold while a worker owns the row

Leased = type[Job] | type[Export]


def taken(worker_id: str, at: float | None = None) -> dict[str, Any]:
    """The column values of a claim: `worker_id` holds the lease from `at` (now by default)."""
    return {"worker_id": worker_id, "heartbeat_at": time.time() if at is None else at}


def renew(session: Session, table: Leased, row_id: str, worker_id: str, **values: Any) -> bool:
    """Record that the worker holding the row is alive, and set `values` on it in the same UPDATE (one row version, not
    two). False when the row is no longer its running row."""
    result = session.execute(
        update(table).where(table.id == row_id, table.status == RUNNING, table.worker_id == worker_id)
        .values(heartbeat_at=time.time(), **values).execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def lapsed(table: Leased, *, heartbeat_timeout_s: float, at: float | None = None) -> ColumnElement[bool]:
    """The condition of a running row whose heartbeat is older than `heartbeat_timeout_s` at Unix time `at` (now by
    default; the sweeper passes its clock's). Put it in the UPDATE that takes the row too: a heartbeat that lands
    between the SELECT and the UPDATE wins."""
    stale_before = (time.time() if at is None else at) - heartbeat_timeout_s
    return (table.status == RUNNING) & (table.heartbeat_at < stale_before)
