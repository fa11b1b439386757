""""A job ended" from the worker's side, with a real Redis broker: a job succeeded by the runner, or failed by the
sweeper, yields one outbox row, announced by the commit that ended it; its handling sends the project's next job; a
lost qlora.job_ended message is sent again by the sweeper."""

from __future__ import annotations

import secrets
import time

import pytest
import redis

from core.queue import control_queue
from tests.api.helpers import queued_tasks
from tests.conftest import REDIS_URL
from tests.job_ended import deliver_job_ended, job_ended_messages, outbox_rows
from tests.worker.helpers import create_job, get_job
from worker import runner
from worker.sweeper import sweep


@pytest.fixture
def settings(make_settings):
    return make_settings(broker_url=REDIS_URL, task_queue=f"qlora-ended-test-{secrets.token_hex(4)}", max_running_jobs_per_project=1)


def training_messages(redis_url: str, settings) -> list[str]:  # noqa: ANN001
    return [args[0] for _, args in reversed(queued_tasks(redis_url, settings.task_queue))]


def assert_one_handled_end(factory, job_id: str, status: str) -> None:  # noqa: ANN001
    [row] = outbox_rows(factory, job_id)
    assert row.status == status and row.handled_at is not None


def test_a_job_the_sweeper_fails_sends_the_next_one(announcing_factory, settings, storage, redis_url):
    factory, celery_app = announcing_factory
    lost = create_job(factory, storage, status="running", worker_id="dead-worker", heartbeat_at=time.time() - 3600, attempt=1)
    waiting = create_job(factory, storage)
    assert sweep(settings.model_copy(update={"heartbeat_timeout_s": 60}), factory, celery_app)["failed"] == [lost]
    assert deliver_job_ended(redis_url, settings, factory, celery_app) == [True]
    assert_one_handled_end(factory, lost, "failed")
    assert training_messages(redis_url, settings) == [waiting]  # once: by the sweep's catch-up or the handling, not both


def test_a_job_the_runner_succeeds_sends_the_next_one_even_when_the_message_is_lost(announcing_factory, settings, storage, redis_url):
    factory, celery_app = announcing_factory
    job_id = create_job(factory, storage, enqueued_at=time.time())
    waiting = create_job(factory, storage)
    assert runner.run_job(job_id, settings, factory, storage) == runner.SUCCEEDED
    assert training_messages(redis_url, settings) == []  # the runner itself sends nothing at the end
    assert len(job_ended_messages(redis_url, settings)) == 1  # its commit announced the end
    redis.Redis.from_url(redis_url).delete(control_queue(settings))  # the broker loses the message
    assert job_ended_messages(redis_url, settings) == []

    patient = settings.model_copy(update={"job_ended_resend_after_s": 3600})
    sweep(patient, factory, celery_app)
    assert job_ended_messages(redis_url, settings) == []  # not yet due
    [row] = outbox_rows(factory, job_id)
    sweep(settings.model_copy(update={"job_ended_resend_after_s": 0}), factory, celery_app)
    assert job_ended_messages(redis_url, settings) == [row.id]
    assert deliver_job_ended(redis_url, settings, factory, celery_app) == [True]
    assert_one_handled_end(factory, job_id, "succeeded")
    assert training_messages(redis_url, settings) == [waiting]
    sweep(settings.model_copy(update={"job_ended_resend_after_s": 0}), factory, celery_app)
    assert job_ended_messages(redis_url, settings) == []  # handled: never sent again
    assert get_job(factory, waiting).status == "queued"
