"""The app factory: builds the FastAPI app and nothing else.

    uvicorn api.main:app                       # settings from QLORA_* variables, built on first access
    uvicorn --factory api.main:create_app      # the same, explicitly

The database schema, the bucket and the API key are made by the prestart step (`python -m core.bootstrap`),
not here. Per-app singletons live on `app.state`: the settings, the session factory, the object storage and
the Celery app (used only to send tasks, by name: this process never imports task code, nor torch).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api.errors import RequestIdMiddleware, register_error_handlers, register_service_error_handlers
from api.guard import RequestGuard
from api.metrics import Metrics, MetricsMiddleware, serve_metrics
from api.openapi import V1_ERRORS, drop_422
from api.routes import chat, checkpoint_permissions, exports, files, health, job_pause, jobs, models, uploads, webhooks
from api.ui import SecurityHeaders, mount_pages
from core.db import make_engine, make_session_factory
from core.job_events import send_on_commit
from core.logs import configure_logging
from core.queue import make_celery
from core.settings import Settings, get_settings
from core.storage import make_storage


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Here, for `uvicorn --factory` builds the app after configuring its own loggers: ours replace them.
    configure_logging(settings.log_format)
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
    celery_app = make_celery(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Prometheus' scrape target, on a port of its own (not the API's): docs/operations.md, "Security model".
        stop_metrics = serve_metrics(_app.state.metrics, settings.metrics_host, settings.metrics_port) if settings.metrics_port else None
        yield
        if stop_metrics:
            stop_metrics()
        await _app.state.inference.aclose()
        _app.state.database_probe.close()
        celery_app.close()
        engine.dispose()

    app = FastAPI(
        title="QLoRA fine-tuning service",
        summary="OpenAI-compatible fine-tuning API: point the openai SDK at http://HOST:PORT/v1.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI is served from the package's files, not a CDN (api/ui.py)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.session_factory = make_session_factory(engine)
    send_on_commit(app.state.session_factory, celery_app, settings)  # a job the API ends (cancel) is announced on commit
    app.state.storage = make_storage(settings)
    app.state.celery = celery_app
    app.state.inference = chat.InferenceClient(settings)
    app.state.metrics = Metrics(app.state.session_factory, celery_app, settings)
    app.state.database_probe = health.DatabaseProbe(app.state.session_factory)

    register_error_handlers(app)
    register_service_error_handlers(app)  # core's refusals (quotas, job requests) as the envelope
    app.add_middleware(RequestGuard, settings=settings)  # the key and the body cap, before any body is read
    app.add_middleware(RequestIdMiddleware)  # outside the guard, so the guard's answers get the ids too
    app.add_middleware(SecurityHeaders)  # CSP, nosniff, no referrer, no framing: on every answer, the guard's too
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: every answer is counted
    for router in (files.router, uploads.router, jobs.router, exports.router, job_pause.router, checkpoint_permissions.router,
                   models.router, chat.router, webhooks.router):
        app.include_router(router, prefix="/v1", responses=V1_ERRORS)
    app.include_router(health.router)
    mount_pages(app)  # the dashboard at /ui (it calls the /v1 routes with the signed-in key), Swagger UI at /docs
    drop_422(app)  # the document lists the 400 envelopes the API sends instead
    return app


def __getattr__(name: str) -> Any:
    # `app` is built on first access (uvicorn's `api.main:app`), so that importing this module has no side
    # effects: no settings read, no storage directory made.
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
