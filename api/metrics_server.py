"""`python -m api.metrics_server`: the Prometheus scrape target of an API run as several processes.

`uvicorn --workers N` (or several API containers on one host) cannot have each process bind QLORA_METRICS_PORT: the
second fails to start. Here one process of its own serves that port: what lives in the database and the broker
(jobs, running jobs' progress, the sweeper, the queue depth; api.metrics.ServiceCollector, the same in any process),
and the request counts and latencies of every API process on the host, which prometheus_client's multiprocess mode
keeps in files under PROMETHEUS_MULTIPROC_DIR (set for the API processes and this one; emptied before they start).
The API processes then run without QLORA_METRICS_PORT. docs/operations.md, "Metrics".
"""

from __future__ import annotations

import os
import signal
import threading

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from api.metrics import ServiceCollector
from core.db import make_engine, make_session_factory
from core.queue import make_celery
from core.settings import Settings, get_settings


def build_registry(settings: Settings) -> CollectorRegistry:
    """The service's values read at scrape time, plus every API process's request metrics when in multiprocess mode."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    engine = make_engine(settings.database_url, pool_size=2, max_overflow=0)
    registry.register(ServiceCollector(make_session_factory(engine), make_celery(settings), settings))
    return registry


def main() -> None:
    settings = get_settings()
    if not settings.metrics_port:
        raise SystemExit("QLORA_METRICS_PORT is not set: the metrics server has no port to serve")
    server, thread = start_http_server(settings.metrics_port, settings.metrics_host, registry=build_registry(settings))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join()


if __name__ == "__main__":
    main()
