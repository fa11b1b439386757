"""Pause and resume of a running job, in-process on a tiny random Llama: the worker checkpoints at the next step
boundary, frees itself, and the resumed run ends with the per-step losses of an uninterrupted run of the same seed."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select, update

from core import ids
from core.db import session_scope
from core.jobs import cancel_job, claim_job, request_pause, resume_job, sweep_lost_jobs
from core.tables import Checkpoint, Job, JobMetric, now
from tests.worker.helpers import checkpoints, create_job, events, get_job, metric_steps, stored_config, wait_until
from worker import runner


def losses(session_factory, job_id: str) -> list[float]:  # noqa: ANN001
    with session_scope(session_factory) as session:
        rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
        return [row.values["train_loss"] for row in rows]


def pause_after(session_factory, job_id: str, steps: int) -> threading.Thread:  # noqa: ANN001
    def pause() -> None:
        wait_until(lambda: len(metric_steps(session_factory, job_id)) >= steps, timeout_s=120, interval_s=0.02, message=f"{steps} steps")
        with session_scope(session_factory) as session:
            assert request_pause(session, job_id)

    thread = threading.Thread(target=pause)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the engine's resume, not the database, is under test
def test_a_paused_and_resumed_job_ends_with_the_losses_of_an_uninterrupted_run(make_settings, session_factory, storage):
    settings = make_settings(heartbeat_interval_s=0.05)
    # No checkpoint_every: the pause itself must write the checkpoint it resumes from.
    hyper = stored_config(max_steps=6, checkpoint_every=None, n_epochs=1, seed=7)
    straight = create_job(session_factory, storage, hyper=hyper)
    assert runner.run_job(straight, settings, session_factory, storage) == runner.SUCCEEDED

    paused = create_job(session_factory, storage, hyper=hyper)
    pauser = pause_after(session_factory, paused, 2)
    assert runner.run_job(paused, settings, session_factory, storage) == runner.PAUSED
    pauser.join()
    job = get_job(session_factory, paused)
    at = metric_steps(session_factory, paused)[-1]
    assert (job.status, job.worker_id, job.pause_requested_at) == ("paused", None, None)
    assert 2 <= at < 6 and [c.step for c in checkpoints(session_factory, paused)] == [at]
    assert job.resume_checkpoint == checkpoints(session_factory, paused)[-1].id
    assert runner.run_job(paused, settings, session_factory, storage) == runner.NOT_CLAIMED  # a paused job is not run

    with session_scope(session_factory) as session:
        assert resume_job(session, paused)
    assert runner.run_job(paused, settings, session_factory, storage) == runner.SUCCEEDED
    assert metric_steps(session_factory, paused) == list(range(1, 7))
    assert losses(session_factory, paused) == pytest.approx(losses(session_factory, straight), rel=1e-6)
    messages = [e.message for e in events(session_factory, paused)]
    assert "Job paused" in messages and "Job resumed" in messages


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_paused_job_can_be_cancelled(make_settings, session_factory, storage):
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=4))
    with session_scope(session_factory) as session:
        assert request_pause(session, job_id)  # queued: paused at once
    assert get_job(session_factory, job_id).status == "paused"
    with session_scope(session_factory) as session:
        assert cancel_job(session, job_id)
        assert not resume_job(session, job_id) and not request_pause(session, job_id)
    assert get_job(session_factory, job_id).status == "cancelled"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_job_whose_worker_died_while_pausing_is_paused_by_the_sweeper(make_settings, session_factory, storage):
    job_id = create_job(session_factory, storage, hyper=stored_config(max_steps=4))
    with session_scope(session_factory) as session:
        assert claim_job(session, job_id, "worker-1")
        session.add(Checkpoint(id=ids.checkpoint_id(), job_id=job_id, step=2, metrics={"step": 2}, storage_key="k",
                               fine_tuned_model_checkpoint="ft:x:ckpt-step-2", created_at=now()))
        assert request_pause(session, job_id)
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=time.time() - 3600))
    with session_scope(session_factory) as session:
        assert sweep_lost_jobs(session, heartbeat_timeout_s=60, max_attempts=3) == [(job_id, "paused")]
    job = get_job(session_factory, job_id)
    assert (job.status, job.worker_id, job.pause_requested_at) == ("paused", None, None)
    assert job.resume_checkpoint == checkpoints(session_factory, job_id)[-1].id
