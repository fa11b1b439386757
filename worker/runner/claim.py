"""A claim while it runs: the worker id that owns it and the heartbeat thread that keeps its lease alive
(core/leases.py), for a job (the runner) and a merged export (worker/export.py) alike."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from core import logs
from core.db import session_scope
from core.leases import Leased, renew

log = logging.getLogger(__name__)


def default_worker_id(tag: str | None = None) -> str:
    """Unique per run: a claim is owned by one run, so a redelivered task in the same process is another owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{tag or secrets.token_hex(4)}"


class Heartbeat(threading.Thread):
    """Renews the lease of row `row_id` of `table` (a job or an export) every `interval_s`; when the row is no
    longer ours (cancelled, failed or taken over) it says so, calls `on_lost` (if given) and stops."""

    def __init__(self, table: Leased, row_id: str, worker_id: str, session_factory: sessionmaker[Session], interval_s: float,
                 on_lost: Callable[[], None] | None = None):
        self.kind = table.__name__.lower()  # "job" or "export": the log lines' words and context key
        super().__init__(name=f"heartbeat-{row_id}", daemon=True)
        self.table, self.row_id, self.worker_id, self.session_factory = table, row_id, worker_id, session_factory
        self.interval_s, self.on_lost = interval_s, on_lost
        self._done = threading.Event()

    def run(self) -> None:
        logs.bind(**{f"{self.kind}_id": self.row_id})  # a thread starts with an empty context
        while not self._done.wait(self.interval_s):
            try:
                with session_scope(self.session_factory) as session:
                    alive = renew(session, self.table, self.row_id, self.worker_id)
            except Exception:
                # A database blip: keep trying. If it lasts, the sweeper takes the row as lost and our next
                # successful heartbeat finds it is no longer ours.
                log.warning("heartbeat of %s %s failed", self.kind, self.row_id, exc_info=True)
                continue
            if not alive:
                log.warning("%s %s is no longer run by %s (cancelled or taken over): stopping", self.kind, self.row_id, self.worker_id)
                if self.on_lost is not None:
                    self.on_lost()
                return

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(timeout=max(30.0, 2 * self.interval_s))
