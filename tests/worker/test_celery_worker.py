"""A real Celery worker process (prefork, concurrency 1, beat embedded with -B) runs jobs sent by name.

Two set-ups: production-like (PostgreSQL, Redis broker) and the embedded mode (SQLite database, kombu's
SQLAlchemy transport on a SQLite file as the broker). The worker imports torch and transformers at start,
so each test pays several seconds before the first task runs.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from sqlalchemy import select

from core import ids
from core.db import make_engine, make_session_factory, session_scope
from core.jobs import mark_enqueued
from core.queue import control_queue, make_celery, send_export_task, send_training_task
from core.settings import Settings
from core.storage import LocalStorage
from core.tables import Export
from tests.job_ended import outbox_rows
from tests.worker.helpers import checkpoints, create_job, events, get_job, wait_until

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 120


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update({
        "QLORA_HOME": str(settings.home),
        "QLORA_DATABASE_URL": settings.database_url,
        "QLORA_BROKER_URL": settings.broker_url,
        "QLORA_TASK_QUEUE": settings.task_queue,
        "QLORA_STORAGE": "local",
        "QLORA_STORAGE_DIR": str(settings.storage_dir),
        "QLORA_MODELS_DIR": str(settings.models_dir),
        "QLORA_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
        "QLORA_HEARTBEAT_TIMEOUT_S": str(settings.heartbeat_timeout_s),
        "QLORA_SWEEP_INTERVAL_S": str(settings.sweep_interval_s),
        "QLORA_WEBHOOK_ALLOWED_NETWORKS": settings.webhook_allowed_networks,
        "QLORA_WEBHOOK_RETRY_SCHEDULE_S": json.dumps(settings.webhook_retry_schedule_s),
        "QLORA_WEBHOOK_TIMEOUT_S": str(settings.webhook_timeout_s),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def worker_name(settings: Settings) -> str:
    """The node name `celery_worker` gives its worker (remote control's `destination`)."""
    return f"{settings.task_queue}@{socket.gethostname()}"


@contextmanager
def celery_worker(settings: Settings, app_module: str, log_path: Path) -> Iterator[subprocess.Popen]:
    """Start `celery -A app_module worker -B` in its own process group; on the way out kill the group (the
    worker, its pool child and the beat process) and, if the test failed, print the worker's log."""
    command = [sys.executable, "-m", "celery", "-A", app_module, "worker", "-Q", f"{settings.task_queue},{control_queue(settings)}", "--pool", "prefork",
               "--concurrency", "1", "-B", "-s", str(settings.home / "celerybeat-schedule"), "--loglevel", "INFO",
               "--hostname", worker_name(settings), "--without-mingle", "--without-gossip", "--without-heartbeat"]
    settings.home.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    except BaseException:
        print(f"--- celery worker log ({log_path}) ---\n{log_path.read_text()[-30000:]}")
        raise
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            # The group can outlive its leader for a moment (pool child, beat): make sure it is gone.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def wait_for_status(factory, job_id: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = JOB_TIMEOUT_S) -> str:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = get_job(factory, job_id).status
        if status in ("succeeded", "failed", "cancelled"):
            return status
        assert proc.poll() is None, f"the worker exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}"
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s} s:\n{log_path.read_text()[-5000:]}")


def make_worker_settings(tmp_path: Path, models_dir: Path, database_url: str, broker_url: str) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, broker_url=broker_url, storage="local",
                    storage_dir=tmp_path / "objects", models_dir=models_dir, task_queue=f"qlora-test-{secrets.token_hex(4)}",
                    heartbeat_interval_s=0.5, heartbeat_timeout_s=30, sweep_interval_s=1)


def test_worker_with_redis_and_postgres_runs_jobs_and_the_sweeper(postgres_url, redis_url, models_dir, tmp_path):
    import redis

    settings = make_worker_settings(tmp_path, models_dir, postgres_url, redis_url)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    storage = LocalStorage(settings.storage_dir)
    job_id = create_job(factory, storage)
    # A job whose worker died before its first checkpoint: beat's sweep must fail it.
    lost_id = create_job(factory, storage, status="running", worker_id="dead-worker", heartbeat_at=time.time() - 3600, attempt=1)
    log_path = tmp_path / "worker.log"
    client = redis.Redis.from_url(redis_url)
    try:
        with celery_worker(settings, "worker.celery_app", log_path) as proc:
            for _ in range(5):  # the same task delivered five times (by name, as the API does): one run
                send_training_task(make_celery(settings), settings, job_id)
            with session_scope(factory) as session:
                mark_enqueued(session, job_id)
            assert wait_for_status(factory, job_id, proc, log_path) == "succeeded"
            wait_until(lambda: log_path.read_text().count(f"job {job_id} not claimed") == 4, 60, interval_s=0.25,
                       message="the four extra deliveries")
            assert get_job(factory, job_id).attempt == 1
            assert [e.message for e in events(factory, job_id)].count("Fine-tuning job started") == 1
            assert wait_for_status(factory, lost_id, proc, log_path, timeout_s=30) == "failed"
            job, lost = get_job(factory, job_id), get_job(factory, lost_id)
            assert job.fine_tuned_model and job.trained_tokens and len(job.result_files) == 2
            assert [c.step for c in checkpoints(factory, job_id)] == [2, 4]
            assert lost.error["code"] == "worker_lost"
            log = log_path.read_text()
            assert "qlora.train" in log and "qlora.sweep" in log

            # the merged export of the job: sent by name to the same queue, run by the same worker
            export_id = ids.export_id()
            with session_scope(factory) as session:
                session.add(Export(id=export_id, job_id=job_id, status="queued", created_at=int(time.time())))
            send_export_task(make_celery(settings), settings, export_id)

            def export_status() -> str:
                with session_scope(factory) as session:
                    return session.execute(select(Export.status).where(Export.id == export_id)).scalar_one()

            wait_until(lambda: export_status() in ("succeeded", "failed"), 120, interval_s=0.25, message="the export")
            assert export_status() == "succeeded", log_path.read_text()[-5000:]
    finally:
        client.delete(settings.task_queue, f"_kombu.binding.{settings.task_queue}")
        client.close()
        engine.dispose()


def test_embedded_mode_worker_with_sqlite_and_the_sqlalchemy_broker(sqlite_url, models_dir, tmp_path):
    settings = make_worker_settings(tmp_path, models_dir, sqlite_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    storage = LocalStorage(settings.storage_dir)
    job_id = create_job(factory, storage)
    log_path = tmp_path / "worker.log"
    try:
        with celery_worker(settings, "worker.celery_app", log_path) as proc:
            send_training_task(make_celery(settings), settings, job_id)
            with session_scope(factory) as session:
                mark_enqueued(session, job_id)
            assert wait_for_status(factory, job_id, proc, log_path) == "succeeded"
            assert len(get_job(factory, job_id).result_files) == 2
            # Trained in a child forked from a parent that imported torch: on a GPU machine this is the check that
            # the parent held no CUDA context (a forked child could not use CUDA then).
            device = "cuda" if torch.cuda.is_available() else "cpu"
            assert any(e.message.startswith("Model loaded") and e.message.endswith(f"device={device}") for e in events(factory, job_id))
            assert "qlora.sweep" in log_path.read_text()  # beat runs over the same broker
            # The job's end, announced by the worker's commit over the same broker, handled by the same worker.
            wait_until(lambda: [r.handled_at is not None for r in outbox_rows(factory, job_id)] == [True], JOB_TIMEOUT_S, interval_s=0.25,
                       message="the job's end handled (qlora.job_ended)")
    finally:
        engine.dispose()


def test_embedded_broker_accepts_the_configured_transport_options(tmp_path):
    """kombu's SQLAlchemy transport hands every broker transport option to create_engine(): a Redis-only option
    such as visibility_timeout must not reach it (it did once: TypeError on the first send)."""
    settings = Settings(home=tmp_path, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}", task_queue="qlora-embedded-check")
    app = make_celery(settings)
    send_training_task(app, settings, "ftjob-none")
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue(settings.task_queue).get(timeout=5)
        assert message.headers["task"] == "qlora.train" and message.payload[0] == ["ftjob-none"]


def test_a_busy_worker_leaves_the_next_job_in_the_queue(postgres_url, redis_url, models_dir, tmp_path):
    """While a worker trains, the next job's message (sent by the worker's own claim of the first) stays in Redis for
    the first idle worker (no prefetch)."""
    import redis

    from core.jobs import cancel_job
    from tests.worker.helpers import stored_config

    settings = make_worker_settings(tmp_path, models_dir, postgres_url, redis_url)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    storage = LocalStorage(settings.storage_dir)
    long_id = create_job(factory, storage, hyper=stored_config(max_steps=100_000, checkpoint_every=100_000))
    next_id = create_job(factory, storage)
    celery_app = make_celery(settings)
    log_path = tmp_path / "worker.log"
    client = redis.Redis.from_url(redis_url)
    try:
        with celery_worker(settings, "worker.celery_app", log_path) as proc:
            send_training_task(celery_app, settings, long_id)
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while get_job(factory, long_id).status != "running":
                assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-5000:]
                time.sleep(0.2)
            # The worker's claim of the first job sent the project's next one (core/dispatch.py).
            while get_job(factory, next_id).enqueued_at is None:
                assert time.monotonic() < deadline, log_path.read_text()[-5000:]
                time.sleep(0.2)
            # A prefetching worker would be blocked in BRPOP on the queue, which Redis answers the moment the message
            # is pushed, before the later broadcast of this ping: once the worker has answered, a prefetch would
            # have emptied the list.
            [reply] = celery_app.control.ping(destination=[worker_name(settings)], timeout=JOB_TIMEOUT_S)
            assert worker_name(settings) in reply, reply
            assert client.llen(settings.task_queue) == 1, "the busy worker reserved the next job's message"
            assert get_job(factory, next_id).status == "queued"
            with session_scope(factory) as session:
                cancel_job(session, long_id)
            assert wait_for_status(factory, next_id, proc, log_path) == "succeeded"  # taken once the worker is idle
            assert get_job(factory, long_id).status == "cancelled"
    finally:
        client.delete(settings.task_queue, f"_kombu.binding.{settings.task_queue}")
        client.close()
        engine.dispose()
