"""Liveness and readiness for load balancers and orchestrators; no API key, outside /v1.

    GET /healthz   200 while the process serves requests
    GET /readyz    200 when the database, the broker and the object storage answer; else 503 naming what failed
    GET /metrics   Prometheus metrics of this API process (api/metrics.py)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from api.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 3.0


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics of this API process", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/readyz", summary="The database, broker and storage are reachable", responses={503: {"description": "A dependency failed"}})
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks = {"database": _database(state.session_factory), "broker": _broker(state.celery), "storage": _storage(state.storage)}
    ready = all(result == "ok" for result in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503)


def _database(session_factory: Any) -> str:
    try:
        with session_factory() as session:
            session.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # what failed is the answer; its text may hold a URL with a password
        return f"error: {type(exc).__name__}"


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
