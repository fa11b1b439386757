"""SIGKILL the process that trains, in a real Celery worker (prefork, beat embedded), after a checkpoint: a new
worker's sweeper requeues the job, it resumes from the checkpoint and succeeds, each step listed once."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from sqlalchemy import update

from core.db import make_engine, make_session_factory, session_scope
from core.jobs import mark_enqueued
from core.queue import make_celery, send_training_task
from core.storage import LocalStorage
from core.tables import Job
from tests.worker.helpers import checkpoints, create_job, events, get_job, metric_steps, stored_config
from tests.worker.test_celery_worker import celery_worker, make_worker_settings, wait_for_status

SLOW_APP = "tests.worker.slow_celery_app"  # the real app, each step 0.5 s


@pytest.mark.timeout(240)
def test_a_sigkilled_training_process_is_resumed_by_a_new_worker(postgres_url, redis_url, models_dir, tmp_path):
    settings = make_worker_settings(tmp_path, models_dir, postgres_url, redis_url)
    settings = settings.model_copy(update={"heartbeat_timeout_s": 3.0, "sweep_interval_s": 1.0})
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    storage = LocalStorage(settings.storage_dir)
    job_id = create_job(factory, storage, hyper=stored_config(max_steps=8, checkpoint_every=2))
    client = redis.Redis.from_url(redis_url)
    try:
        first_log = tmp_path / "worker-1.log"
        with celery_worker(settings, SLOW_APP, first_log) as proc:
            send_training_task(make_celery(settings), settings, job_id)
            with session_scope(factory) as session:
                mark_enqueued(session, job_id)
            deadline = time.monotonic() + 120
            # Killed once a step past the first checkpoint is recorded: the resumed run produces that step again.
            while not (saved := checkpoints(factory, job_id)) or max(metric_steps(factory, job_id)) <= saved[0].step:
                assert time.monotonic() < deadline and proc.poll() is None, first_log.read_text()[-5000:]
                time.sleep(0.05)
            # The worker id is host:pid:task: the pid of the prefork child that runs the job.
            trainer_pid = int(get_job(factory, job_id).worker_id.split(":")[1])
            assert trainer_pid != proc.pid
            os.kill(trainer_pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)  # and the rest of that worker (its master and beat): the host is gone
            proc.wait(10)
        killed_at = max(metric_steps(factory, job_id))
        assert killed_at < 8 and get_job(factory, job_id).status == "running"  # nothing marked it: only the heartbeat stops

        second_log = tmp_path / "worker-2.log"
        with celery_worker(settings, SLOW_APP, second_log) as proc:
            assert wait_for_status(factory, job_id, proc, second_log, timeout_s=180) == "succeeded"
        job = get_job(factory, job_id)
        assert job.attempt == 2 and len(job.result_files) == 2
        assert metric_steps(factory, job_id) == list(range(1, 9))  # each step's row once
        evs = events(factory, job_id)
        assert [e.data["step"] for e in evs if e.type == "metrics"] == list(range(1, 9))  # and its event once, in order
        resumed = [e.message for e in evs if e.message.startswith("Resumed from")]
        assert len(resumed) == 1, [e.message for e in evs]
        resume_step = int(resumed[0].rsplit(" ", 1)[1])
        assert killed_at > resume_step  # steps past the checkpoint were recorded by the killed run, and again after
        assert any(e.level == "warn" and f"resuming from the checkpoint at step {resume_step}" in e.message for e in evs)
        steps = [c.step for c in checkpoints(factory, job_id)]
        assert steps == sorted(set(steps)) and steps[-1] == 8 and resume_step in steps
    finally:
        client.delete(settings.task_queue, f"_kombu.binding.{settings.task_queue}")
        client.close()
        with session_scope(factory) as session:  # nothing of ours left running for another test's sweeper
            session.execute(update(Job).where(Job.id == job_id, Job.status.in_(["queued", "running"])).values(status="cancelled"))
        engine.dispose()
