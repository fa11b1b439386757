"""Outages while a job trains, caused for real: the worker reaches PostgreSQL and the S3-compatible server through
a TCP proxy (tests/faults.py) that the test cuts and restores."""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import select

from core.db import make_engine, make_session_factory, session_scope
from core.settings import Settings
from core.storage import LocalStorage, S3Storage
from core.tables import JobEvent
from tests.faults import TcpProxy
from tests.worker.helpers import checkpoints, create_job, events, get_job, metric_steps, stored_config, wait_until
from worker import runner
from worker.sweeper import sweep


def through(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + f":{proxy.port}"))


def metric_events(factory, job_id: str) -> list[int]:  # noqa: ANN001
    with session_scope(factory) as session:
        rows = session.execute(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")).scalars()
        return sorted(data["step"] for data in rows)


def run_in_thread(*args) -> tuple[threading.Thread, list[str]]:  # noqa: ANN002
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(*args)), daemon=True)
    thread.start()
    return thread, outcome


class Retries(logging.Handler):
    """The warnings worker/retry.py logs before each retry ("job ...: database write failed (...), retrying ..."):
    the positive sign that the worker met an outage and is waiting it out."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def of(self, what: str) -> int:
        return sum(f"{what} failed" in message for message in self.messages)


@pytest.fixture
def retries():
    handler = Retries()
    logger = logging.getLogger("worker.retry")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def slow_steps(monkeypatch):
    """A tiny model trains a step in milliseconds: 0.3 s a step, so that a cut lands in the middle of the job."""
    from worker.database_sink import DatabaseSink

    original = DatabaseSink.metrics

    def metrics(self, step, values):  # noqa: ANN001
        time.sleep(0.3)
        original(self, step, values)

    monkeypatch.setattr(DatabaseSink, "metrics", metrics)


@pytest.fixture
def pg_proxy(postgres_url):
    proxy = TcpProxy(urlsplit(postgres_url).port or 5432)
    yield proxy
    proxy.close()


def behind_proxy(postgres_url: str, proxy: TcpProxy, models_dir, tmp_path, **overrides):  # noqa: ANN001, ANN003
    """A direct session factory (for the test), an engine through the proxy (for the worker), settings, storage."""
    direct = make_session_factory(make_engine(postgres_url))
    worker_engine = make_engine(through(postgres_url, proxy))
    settings = Settings(home=tmp_path, database_url=through(postgres_url, proxy), storage="local", storage_dir=tmp_path / "objects",
                        models_dir=models_dir, heartbeat_interval_s=0.2, **overrides)
    return direct, worker_engine, settings, LocalStorage(settings.storage_dir)


@pytest.mark.timeout(180)
def test_the_database_refusing_connections_mid_job_costs_time_not_the_job(postgres_url, pg_proxy, models_dir, tmp_path,
                                                                          slow_steps, retries):
    direct, worker_engine, settings, storage = behind_proxy(postgres_url, pg_proxy, models_dir, tmp_path, outage_retry_s=60)
    job_id = create_job(direct, storage, hyper=stored_config(max_steps=12, checkpoint_every=4))
    thread, outcome = run_in_thread(job_id, settings, make_session_factory(worker_engine), storage)
    wait_until(lambda: len(metric_steps(direct, job_id)) >= 2, 60, message="step 2")
    pg_proxy.cut()
    cut_at = metric_steps(direct, job_id)[-1]
    # Four retries of one write, ~4 s of backoff: a worker that gave up at the first refusal would have logged none.
    wait_until(lambda: retries.of("database write") >= 4, 60, message="four retries of a database write")
    assert thread.is_alive() and get_job(direct, job_id).status == "running", outcome  # waiting, not failed
    pg_proxy.restore()
    thread.join(120)
    assert outcome == [runner.SUCCEEDED]
    job = get_job(direct, job_id)
    assert job.status == "succeeded" and job.attempt == 1 and len(job.result_files) == 2
    assert cut_at < 12
    assert metric_steps(direct, job_id) == list(range(1, 13))  # each step's metrics once
    assert set(metric_events(direct, job_id)) == set(range(1, 13))
    assert [c.step for c in checkpoints(direct, job_id)] == [4, 8, 12]
    worker_engine.dispose()


@pytest.mark.timeout(180)
def test_a_lasting_database_outage_leaves_the_job_to_the_sweeper_which_resumes_it(postgres_url, pg_proxy, models_dir, tmp_path,
                                                                                  slow_steps):
    direct, worker_engine, settings, storage = behind_proxy(postgres_url, pg_proxy, models_dir, tmp_path, outage_retry_s=3,
                                                            heartbeat_timeout_s=2)
    job_id = create_job(direct, storage, hyper=stored_config(max_steps=8, checkpoint_every=2))
    thread, outcome = run_in_thread(job_id, settings, make_session_factory(worker_engine), storage)
    wait_until(lambda: len(checkpoints(direct, job_id)) >= 1, 60, message="the first checkpoint")
    pg_proxy.cut()
    thread.join(60)
    assert outcome == [runner.STOPPED]
    job = get_job(direct, job_id)
    assert job.status == "running" and job.error is None  # not failed: left to the sweeper
    pg_proxy.restore()

    class Sent:
        def send_task(self, *args, **kwargs):  # noqa: ANN002, ANN003
            pass

    # The sweeper's clock past the heartbeat timeout, instead of waiting for it.
    assert sweep(settings, direct, Sent(), clock=lambda: time.time() + settings.heartbeat_timeout_s + 1)["requeued"] == [job_id]
    assert runner.run_job(job_id, settings, direct, storage) == runner.SUCCEEDED
    job = get_job(direct, job_id)
    assert job.status == "succeeded" and job.attempt == 2
    assert metric_steps(direct, job_id) == list(range(1, 9))
    assert any(e.message.startswith("Resumed from") for e in events(direct, job_id))
    worker_engine.dispose()


@pytest.mark.timeout(180)
def test_the_object_store_unreachable_during_uploads_costs_time_not_the_job(postgres_url, s3_endpoint, aws_test_credentials,
                                                                            models_dir, tmp_path, slow_steps, retries):
    proxy = TcpProxy(urlsplit(s3_endpoint).port)
    direct = make_session_factory(make_engine(postgres_url))
    settings = Settings(home=tmp_path, database_url=postgres_url, storage="s3", s3_endpoint=f"http://127.0.0.1:{proxy.port}",
                        s3_bucket="qlora-outage-test", s3_region="us-east-1", models_dir=models_dir, heartbeat_interval_s=0.2,
                        outage_retry_s=60)
    storage = S3Storage(settings.s3_bucket, settings.s3_endpoint, settings.s3_region)
    storage.ensure_bucket()
    job_id = create_job(direct, storage, hyper=stored_config(max_steps=6, checkpoint_every=3))
    thread, outcome = run_in_thread(job_id, settings, direct, storage)
    wait_until(lambda: len(metric_steps(direct, job_id)) >= 1, 60, message="step 1")
    proxy.cut()  # from before the first upload (the step-3 checkpoint) ...
    wait_until(lambda: len(metric_steps(direct, job_id)) >= 3, 60, message="step 3")
    wait_until(lambda: retries.of("checkpoint upload") >= 3, 60, message="three retries of the checkpoint upload")
    assert checkpoints(direct, job_id) == [] and thread.is_alive()
    proxy.restore()  # ... until the step-3 checkpoint's upload was retried three times
    thread.join(120)
    proxy.close()
    assert outcome == [runner.SUCCEEDED]
    assert [c.step for c in checkpoints(direct, job_id)] == [3, 6] and len(get_job(direct, job_id).result_files) == 2


@pytest.mark.timeout(180)
def test_a_full_local_disk_stops_the_run_without_failing_the_job(postgres_url, models_dir, tmp_path, slow_steps):
    """The local backend's disk fills up after the first checkpoint: the next checkpoint's write fails and leaves
    nothing, is retried for QLORA_OUTAGE_RETRY_S, then the run stops with the job still running (an outage, not the
    job's fault). With the space back, the sweeper resumes it from its checkpoint and it succeeds."""
    from tests.faults import fill, small_disk

    factory = make_session_factory(make_engine(postgres_url))
    with small_disk(tmp_path / "disk", "8m") as disk:
        settings = Settings(home=tmp_path, database_url=postgres_url, storage="local", storage_dir=disk / "objects",
                            models_dir=models_dir, heartbeat_interval_s=0.2, heartbeat_timeout_s=1, outage_retry_s=2)
        storage = LocalStorage(settings.storage_dir)
        job_id = create_job(factory, storage, hyper=stored_config(max_steps=6, checkpoint_every=2))
        filler: list = []

        def fill_after_the_first_checkpoint() -> None:
            wait_until(lambda: len(checkpoints(factory, job_id)) >= 1, 60, message="the first checkpoint")
            filler.append(fill(disk))

        filling = threading.Thread(target=fill_after_the_first_checkpoint, daemon=True)
        filling.start()
        assert runner.run_job(job_id, settings, factory, storage) == runner.STOPPED
        filling.join(5)
        job = get_job(factory, job_id)
        assert job.status == "running" and job.error is None  # left to the sweeper, not failed
        assert [c.step for c in checkpoints(factory, job_id)] == [2]
        assert not list(disk.rglob("*.partial"))  # the failed writes left nothing behind

        filler[0].unlink()  # the space is back

        class Sent:
            def send_task(self, *args, **kwargs):  # noqa: ANN002, ANN003
                pass

        later = time.time() + settings.heartbeat_timeout_s + 1  # the sweeper's clock past the heartbeat timeout
        assert sweep(settings, factory, Sent(), clock=lambda: later)["requeued"] == [job_id]
        assert runner.run_job(job_id, settings, factory, storage) == runner.SUCCEEDED
        assert metric_steps(factory, job_id) == list(range(1, 7))
        assert [c.step for c in checkpoints(factory, job_id)] == [2, 4, 6]
