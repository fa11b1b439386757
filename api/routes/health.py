"""Liveness and readiness for load balancers and orchestrators; no API key, outside /v1.

    GET /healthz   200 while the process serves requests
    GET /readyz    200 when the database, the broker and the object storage answer; else 503 naming what failed

Prometheus metrics are not here: they have a port of their own (api/metrics.py, QLORA_METRICS_PORT).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as CheckTimeout
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 3.0


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database, broker and storage are reachable", responses={503: {"description": "A dependency failed"}})
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks = {"database": state.database_probe(), "broker": _broker(state.celery), "storage": _storage(state.storage)}
    ready = all(result == "ok" for result in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503)


class DatabaseProbe:
    """`SELECT 1` on a thread of its own, so that /readyz gives up after CHECK_TIMEOUT_S on a database server that
    accepts connections and never answers (libpq has no read timeout). While one check is stuck, later calls report
    it instead of starting another: a hung server costs at most one thread and one connection."""

    def __init__(self, session_factory: Any):
        self._session_factory = session_factory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readyz-db")
        self._lock = threading.Lock()
        self._pending: Any = None

    def __call__(self) -> str:
        with self._lock:
            if self._pending is None or self._pending.done():
                self._pending = self._executor.submit(self._select_one)
            pending = self._pending
        try:
            return pending.result(timeout=CHECK_TIMEOUT_S)
        except CheckTimeout:
            return f"error: no answer within {CHECK_TIMEOUT_S:g} s"

    def _select_one(self) -> str:
        try:
            with self._session_factory() as session:
                session.execute(text("SELECT 1"))
            return "ok"
        except Exception as exc:  # what failed is the answer; its text may hold a URL with a password
            return f"error: {type(exc).__name__}"

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _broker(celery_app: Any) -> str:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"


def _storage(storage: Any) -> str:
    root = getattr(storage, "root", None)  # the local backend: its directory must be there and writable
    if root is not None:
        return "ok" if Path(root).is_dir() and os.access(root, os.W_OK) else "error: not a writable directory"
    try:
        storage.probe(CHECK_TIMEOUT_S)  # S3: one short request, so a hung endpoint costs seconds, not minutes
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"
