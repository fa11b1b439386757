"""A job's claim while it runs: the worker id that owns it and the heartbeat thread that keeps the claim alive."""

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
from core.jobs import heartbeat

log = logging.getLogger(__name__)


def default_worker_id(tag: str | None = None) -> str:
    """Unique per run: a claim is owned by one run, so a redelivered task in the same process is another owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{tag or secrets.token_hex(4)}"


class Heartbeat(threading.Thread):
    """Writes the job's heartbeat every `interval_s`; calls `on_lost` (once) when the job is no longer ours."""

    def __init__(self, job_id: str, worker_id: str, session_factory: sessionmaker[Session], interval_s: float,
                 on_lost: Callable[[], None]):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.worker_id, self.session_factory = job_id, worker_id, session_factory
        self.interval_s, self.on_lost = interval_s, on_lost
        self._done = threading.Event()

    def run(self) -> None:
        logs.bind(job_id=self.job_id)  # a thread starts with an empty context
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
