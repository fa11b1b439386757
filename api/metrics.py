"""Prometheus metrics of the service, served by each API process on a port of their own (`QLORA_METRICS_PORT`, not
the API's port: they name jobs, workers and every project's counts, so only the monitoring network may reach
them; docs/operations.md, "Security model"). Request counts and latency by route template and status of this process, and, read at scrape time,
what the workers and the sweeper wrote to the database: jobs by status, each running job's progress (step, step
time, tokens/s, peak memory, and a dpo job's reward accuracy and margin), the sweeper's actions; and the training queue's depth in the broker. The workers
export nothing themselves: a Celery child lives for one job, the database outlives it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import CompoundSelect, Select, func, select, text, union_all
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.openapi import path_patterns
from core.queue import training_queue_depth
from core.settings import Settings
from core.tables import ACTIVE_JOBS, Job, JobEndCount, JobMetric, SweeperAction


def jobs_by_status() -> CompoundSelect[Any]:
    """Jobs by status in one statement: those not yet ended counted through the partial index ix_jobs_active_status,
    the ended ones from job_end_counts (counted as they end). A scrape reads the backlog, never the history."""
    return union_all(select(Job.status, func.count()).where(text(ACTIVE_JOBS)).group_by(Job.status),
                     select(JobEndCount.status, JobEndCount.count))


def running_jobs_newest_step() -> Select[Any]:
    """Every running job with its newest job_metrics row (id, worker, total steps, step, values), in one statement:
    the newest step is a max() per job that the (job_id, step) unique index answers from its last entry."""
    newest_step = select(func.max(JobMetric.step)).where(JobMetric.job_id == Job.id).correlate(Job).scalar_subquery()
    return (select(Job.id, Job.worker_id, Job.total_steps, JobMetric.step, JobMetric.values)
            .join(JobMetric, (JobMetric.job_id == Job.id) & (JobMetric.step == newest_step))
            .where(Job.status == "running"))


class ServiceCollector(Collector):
    """Values read when Prometheus scrapes: they live in the database and the broker, not in this process."""

    # Gauges of each running job, from the values of its newest step: (name, help, key in the step's values).
    JOB_GAUGES = (
        ("qlora_job_step", "The running job's latest optimizer step", "step"),
        ("qlora_job_total_steps", "Optimizer steps the running job trains in all", "total_steps"),
        ("qlora_job_step_seconds", "Wall-clock seconds of the running job's latest step", "step_seconds"),
        ("qlora_job_tokens_per_second", "Tokens per second of the running job's latest step", "tokens_per_second"),
        ("qlora_job_peak_memory_bytes", "Peak accelerator memory of the running job's run so far (CPU: 0)", "peak_memory_bytes"),
        # A dpo job's preference numbers (a supervised job has none, so it has no sample): TRL's rewards/accuracies
        # and rewards/margins of the latest step.
        ("qlora_job_reward_accuracy", "dpo: share of the latest step's pairs whose preferred answer had the higher reward",
         "train_rewards_accuracies"),
        ("qlora_job_reward_margin", "dpo: mean preferred minus non-preferred reward of the latest step's pairs", "train_rewards_margins"),
    )

    def __init__(self, session_factory: Any, celery_app: Any, settings: Settings):
        self.session_factory, self.celery_app, self.settings = session_factory, celery_app, settings

    def collect(self):  # noqa: ANN201
        jobs = GaugeMetricFamily("qlora_jobs", "Jobs by status, all projects", labels=["status"])
        with self.session_factory() as session:
            for status, count in session.execute(jobs_by_status()):
                jobs.add_metric([status], count)
        yield jobs
        yield from self._running_jobs()
        yield from self._sweeper()
        try:
            waiting = training_queue_depth(self.celery_app, self.settings)
        except Exception:  # the broker is down: no sample rather than a failed scrape
            waiting = None
        if waiting is not None:
            yield GaugeMetricFamily("qlora_queue_depth", "Messages waiting in the broker's training queue", value=waiting)

    def _running_jobs(self):  # noqa: ANN202
        """One sample per running job that has trained a step (so the label values stay as few as the GPUs), from
        its newest job_metrics row and the job's total_steps. One query for all running jobs, whatever their number:
        each job's newest step is found through the (job_id, step) unique index, never by reading its history."""
        families = [GaugeMetricFamily(name, help, labels=["job_id", "worker"]) for name, help, _ in self.JOB_GAUGES]
        with self.session_factory() as session:
            rows = session.execute(running_jobs_newest_step()).all()
        for job_id, worker_id, total_steps, step, values in rows:
            data = {**values, "step": step, "total_steps": total_steps}
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


def serve_metrics(metrics: Metrics, host: str, port: int) -> Callable[[], None]:
    """Serve `metrics` at http://HOST:PORT/metrics from a thread of this process; returns what stops it. A port
    in use is an OSError here, so the API does not start without its metrics."""
    server, thread = start_http_server(port, host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop


# Label values come from this fixed set, never from the request as sent: a caller choosing the method or the
# path must not be able to add series (each one lives as long as the process, and every scrape lists them).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(scope: Scope) -> str:
    method = scope["method"]
    return method if method in METHODS else "other"


def route_templates(app: Any) -> list[tuple[re.Pattern[str], str]]:
    """The app's own route templates, each with the pattern of the paths it serves: its OpenAPI paths (literal
    ones first), then the other routes and mounts (/docs, /ui/{path})."""
    templates = [(regex, path) for regex, path, _ in path_patterns(app)]
    known = {path for _, path in templates}
    return templates + [(route.path_regex, route.path_format) for route in app.routes
                        if isinstance(route, (Route, Mount)) and route.path_format not in known]


def route_template(scope: Scope, templates: list[tuple[re.Pattern[str], str]]) -> str:
    """The template of the route that served the request (`/v1/files/{file_id}` for `/v1/files/file-abc`): one of
    `templates`, never the path as sent. 'unrouted' for a request that never reached a route (refused by the
    guard, an unknown URL)."""
    if "endpoint" in scope:  # set by the router for its routes and mounts alike
        for regex, template in templates:
            if regex.match(scope["path"]):
                return template
    return "unrouted"


class MetricsMiddleware:
    """Counts every request under its route template (bounded label values) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.templates: list[tuple[re.Pattern[str], str]] | None = None  # read from the app on its first request

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
            if self.templates is None:
                self.templates = route_templates(scope["app"])
            method, route = method_label(scope), route_template(scope, self.templates)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
