"""Prometheus metrics of the API process, scraped at GET /metrics (no API key: expose it to the monitoring network
only). Request counts and latency by route template and status, and, read at scrape time, jobs by status and the
training queue's depth. The workers' own metrics (step time, tokens/s) are in each job's `/metrics` route.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.models import Job
from core.queue import queued_training_jobs
from core.settings import Settings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServiceCollector(Collector):
    """Values read when Prometheus scrapes: they live in the database and the broker, not in this process."""

    def __init__(self, session_factory: Any, celery_app: Any, settings: Settings):
        self.session_factory, self.celery_app, self.settings = session_factory, celery_app, settings

    def collect(self):  # noqa: ANN201
        jobs = GaugeMetricFamily("qlora_jobs", "Jobs by status, all projects", labels=["status"])
        with self.session_factory() as session:
            for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
                jobs.add_metric([status], count)
        yield jobs
        try:
            waiting = queued_training_jobs(self.celery_app, self.settings)
        except Exception:  # the broker is down: no sample rather than a failed scrape
            waiting = None
        if waiting is not None:
            yield GaugeMetricFamily("qlora_queue_depth", "Training messages waiting in the broker's queue", value=len(waiting))


class Metrics:
    """One registry per app, so that two apps in one process (the tests) do not share counters."""

    def __init__(self, session_factory: Any, celery_app: Any, settings: Settings):
        self.registry = CollectorRegistry()
        self.requests = Counter("qlora_api_requests", "API requests by route and status", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("qlora_api_request_seconds", "API request latency by route", ["method", "route"],
                                 registry=self.registry)
        self.registry.register(ServiceCollector(session_factory, celery_app, settings))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """`/v1/files/{file_id}` for `/v1/files/file-abc`: label values stay few. 'unrouted' for a request that never
    reached a route (refused by the guard, an unknown URL)."""
    if "route" not in scope:
        return "unrouted"
    path = scope["path"]
    for name, value in scope.get("path_params", {}).items():
        path = path.replace(str(value), "{" + name + "}", 1)
    return path


class MetricsMiddleware:
    """Counts every request under its route template (bounded label values) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_template(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
