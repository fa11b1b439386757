"""Messages lost while jobs wait: Redis restarts without persistence (the sweeper sends them again, and a real worker
runs each job exactly once), or the embedded broker's message is taken and never started."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from core.db import make_engine, make_session_factory, session_scope
from core.jobs import mark_enqueued
from core.queue import TRAIN_TASK, make_celery, queued_training_jobs, send_training_task
from core.storage import LocalStorage
from core.tables import Job
from tests.conftest import free_port, wait_for_port
from tests.worker.helpers import create_job, events, get_job, wait_until
from tests.worker.test_celery_worker import celery_worker, make_worker_settings, wait_for_status
from worker.sweeper import sweep


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server program")
@pytest.mark.timeout(240)
def test_jobs_queued_across_a_redis_restart_run_exactly_once(postgres_url, models_dir, tmp_path):
    port = free_port()
    server = start_redis(port, tmp_path)
    settings = make_worker_settings(tmp_path, models_dir, postgres_url, f"redis://127.0.0.1:{port}/0")
    settings = settings.model_copy(update={"lost_message_after_s": 1.0, "sweep_interval_s": 1.0})
    factory = make_session_factory(make_engine(postgres_url))
    storage = LocalStorage(settings.storage_dir)
    celery_app = make_celery(settings)
    jobs = [create_job(factory, storage) for _ in range(3)]

    def later() -> float:  # the sweeper's clock, past QLORA_LOST_MESSAGE_AFTER_S since the sends
        return time.time() + 1.5

    try:
        for job_id in jobs:
            send_training_task(celery_app, settings, job_id)
            with session_scope(factory) as session:
                mark_enqueued(session, job_id)
        assert sweep(settings, factory, celery_app, clock=later)["sent"] == []  # the messages are there: nothing to resend

        server.terminate()
        server.wait(10)
        server = start_redis(port, tmp_path)  # empty: the three messages are gone
        client = redis.Redis(port=port)
        assert client.llen(settings.task_queue) == 0
        assert sorted(sweep(settings, factory, celery_app, clock=later)["sent"]) == sorted(jobs)
        assert client.llen(settings.task_queue) == 3
        # A message sent twice (the sweeper racing a worker) must not run a job twice.
        send_training_task(celery_app, settings, jobs[0])

        with celery_worker(settings, "worker.celery_app", tmp_path / "worker.log") as proc:
            for job_id in jobs:
                assert wait_for_status(factory, job_id, proc, tmp_path / "worker.log") == "succeeded"
            # The duplicate message is consumed too: the runner finds its job no longer queued and says so.
            log = tmp_path / "worker.log"
            wait_until(lambda: f"job {jobs[0]} not claimed" in log.read_text(), 60, interval_s=0.2, message="the duplicate's run")
        for job_id in jobs:
            job = get_job(factory, job_id)
            assert job.attempt == 1, job_id  # claimed once
            assert sum(e.message.startswith("Fine-tuning job started") for e in events(factory, job_id)) == 1
    finally:
        server.terminate()
        server.wait(10)
        with session_scope(factory) as session:  # nothing of ours left running for another test's sweeper
            session.execute(update(Job).where(Job.id.in_(jobs), Job.status != "succeeded").values(status="cancelled"))


def test_a_message_lost_from_the_embedded_broker_is_sent_again(make_settings, session_factory, storage, tmp_path):
    """The embedded mode's SQLite broker: a job whose message a consumer took and never started (taken without an ack
    by a process that then went away) is sent again by the sweep; a message still waiting is left alone."""
    settings = make_settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}", lost_message_after_s=1.0,
                             task_queue=f"qlora-test-{secrets.token_hex(4)}")
    celery_app = make_celery(settings)
    job_id = create_job(session_factory, storage)
    send_training_task(celery_app, settings, job_id)
    with session_scope(session_factory) as session:
        mark_enqueued(session, job_id)

    def later() -> float:  # the sweeper's clock, past QLORA_LOST_MESSAGE_AFTER_S since the send
        return time.time() + 1.5

    assert queued_training_jobs(celery_app, settings) == {job_id}
    assert sweep(settings, session_factory, celery_app, clock=later)["sent"] == []  # it waits: nothing to resend

    with celery_app.connection_for_write() as conn, conn.SimpleQueue(settings.task_queue, no_ack=True) as queue:
        taken = queue.get(timeout=10)
    assert taken.headers["task"] == TRAIN_TASK and taken.payload[0] == [job_id]
    assert queued_training_jobs(celery_app, settings) == set()
    assert sweep(settings, session_factory, celery_app, clock=later)["sent"] == [job_id]
    assert queued_training_jobs(celery_app, settings) == {job_id}
