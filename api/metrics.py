"""Prometheus metrics of the service, scraped at the API's GET /metrics (no API key: expose it to the monitoring
network only). Request counts and latency by route template and status of this process, and, read at scrape time,
what the workers and the sweeper wrote to the database: jobs by status, each running job's progress (step, step
time, tokens/s, peak memory), the sweeper's actions; and the training queue's depth in the broker. The workers
export nothing themselves: a Celery child lives for one job, the database outlives it.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.models import Job, JobMetric, SweeperAction
from core.queue import queued_training_jobs
from core.settings import Settings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServiceCollector(Collector):
    """Values read when Prometheus scrapes: they live in the database and the broker, not in this process."""

    # Gauges of each running job, from the values of its newest step: (name, help, key in the step's values).
    JOB_GAUGES = (
        ("qlora_job_step", "The running job's latest optimizer step", "step"),
        ("qlora_job_total_steps", "Optimizer steps the running job trains in all", "total_steps"),
        ("qlora_job_step_seconds", "Wall-clock seconds of the running job's latest step", "step_seconds"),
        ("qlora_job_tokens_per_second", "Tokens per second of the running job's latest step", "tokens_per_second"),
        ("qlora_job_peak_memory_bytes", "Peak accelerator memory of the running job's run so far (CPU: 0)", "peak_memory_bytes"),
    )

    def __init__(self, session_factory: Any, celery_app: Any, settings: Settings):
        self.session_factory, self.celery_app, self.settings = session_factory, celery_app, settings

    def collect(self):  # noqa: ANN201
        jobs = GaugeMetricFamily("qlora_jobs", "Jobs by status, all projects", labels=["status"])
        with self.session_factory() as session:
            for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
                jobs.add_metric([status], count)
        yield jobs
        yield from self._running_jobs()
        yield from self._sweeper()
        try:
            waiting = queued_training_jobs(self.celery_app, self.settings)
        except Exception:  # the broker is down: no sample rather than a failed scrape
            waiting = None
        if waiting is not None:
            yield GaugeMetricFamily("qlora_queue_depth", "Training messages waiting in the broker's queue", value=len(waiting))

    def _running_jobs(self):  # noqa: ANN202
        """One sample per running job that has trained a step (so the label values stay as few as the GPUs), from
        its newest job_metrics row and the job's total_steps."""
        families = [GaugeMetricFamily(name, help, labels=["job_id", "worker"]) for name, help, _ in self.JOB_GAUGES]
        with self.session_factory() as session:
            running = session.execute(select(Job.id, Job.worker_id, Job.total_steps).where(Job.status == "running")).all()
            for job_id, worker_id, total_steps in running:
                newest = session.execute(select(JobMetric.step, JobMetric.values).where(JobMetric.job_id == job_id)
                                         .order_by(JobMetric.step.desc()).limit(1)).one_or_none()
                if newest is None:
                    continue
                data = {**newest.values, "step": newest.step, "total_steps": total_steps}
                worker = ":".join((worker_id or "").split(":")[:2])  # host:pid; the run's own tag would add nothing
                for family, (_, _, key) in zip(families, self.JOB_GAUGES, strict=True):
                    value = data.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        family.add_metric([job_id, worker], value)
        yield from families

    def _sweeper(self):  # noqa: ANN202
        actions = CounterMetricFamily("qlora_sweeper_actions", "What the sweeper did: sweeps (passes), requeued and failed "
                                      "(lost jobs), resent (queued jobs' messages), failed_exports, resent_exports, expired_files",
                                      labels=["action"])
        last = None
        with self.session_factory() as session:
            for action, count, updated_at in session.execute(select(SweeperAction.action, SweeperAction.count, SweeperAction.updated_at)):
                actions.add_metric([action], count)
                if action == "sweeps":
                    last = updated_at
        yield actions
        if last is not None:
            yield GaugeMetricFamily("qlora_sweeper_last_sweep_timestamp_seconds", "Unix time of the sweeper's last pass", value=last)


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
