""""A job ended" (core/job_events.py) on PostgreSQL and SQLite with a real Redis broker: the outbox row is announced
only by the commit that wrote it, its handling dispatches the project's next job once, and a handling the broker
refuses leaves the row for the sweeper's resend."""

from __future__ import annotations

import secrets
import time

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.job_events import handle_job_ended
from core.jobs import JobStatus, cancel_job, fail_job, mark_enqueued, transition
from core.queue import make_celery, send_job_ended_task
from core.settings import Settings
from core.tables import Job
from tests.api.helpers import queued_tasks
from tests.core.test_jobs import make_job
from tests.job_ended import deliver_job_ended, job_ended_messages, outbox_rows


@pytest.fixture
def settings(tmp_path, database_url, redis_url) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, broker_url=redis_url, storage="local",
                    task_queue=f"qlora-events-test-{secrets.token_hex(4)}", max_running_jobs_per_project=1)


def training_messages(redis_url: str, settings: Settings) -> list[str]:
    return [args[0] for _, args in reversed(queued_tasks(redis_url, settings.task_queue))]


def end_running_job(factory) -> tuple[str, str, str]:  # noqa: ANN001
    """A running job of project "default" failed (committed), beside the project's next job, queued and not sent
    (max_running_jobs_per_project 1). Returns the ended job's id, its outbox row's id and the next job's id."""
    running = make_job(factory, JobStatus.RUNNING, worker_id="w1", heartbeat_at=time.time(), attempt=1)
    waiting = make_job(factory, JobStatus.QUEUED)
    with factory() as session:
        assert fail_job(session, running, code="training_error", message="boom", worker_id="w1")
        session.commit()
    [row] = outbox_rows(factory, running)
    return running, row.id, waiting


def test_only_the_commit_announces_the_end(announcing_factory, settings, redis_url):
    factory, _ = announcing_factory
    job_id = make_job(factory, JobStatus.QUEUED)
    with factory() as session:
        assert cancel_job(session, job_id)
        assert job_ended_messages(redis_url, settings) == []  # written, not committed: nothing said yet
        session.rollback()
        assert outbox_rows(factory, job_id) == [] and job_ended_messages(redis_url, settings) == []
        session.commit()  # the session's next commit announces nothing left over from the rollback
    assert job_ended_messages(redis_url, settings) == []

    with factory() as session:
        assert cancel_job(session, job_id)
        session.commit()
    [row] = outbox_rows(factory, job_id)
    assert row.status == "cancelled" and row.handled_at is None
    assert job_ended_messages(redis_url, settings) == [row.id]


def test_a_requeue_is_no_end(announcing_factory, settings, redis_url):
    factory, _ = announcing_factory
    job_id = make_job(factory, JobStatus.RUNNING, worker_id="w1", heartbeat_at=time.time(), attempt=1)
    with factory() as session:
        assert transition(session, job_id, JobStatus.QUEUED, only_from={JobStatus.RUNNING}, worker_id=None)
        session.commit()
    assert outbox_rows(factory, job_id) == [] and job_ended_messages(redis_url, settings) == []


def test_the_end_dispatches_the_projects_next_job_once(announcing_factory, settings, redis_url):
    factory, celery_app = announcing_factory
    running, outbox_id, waiting = end_running_job(factory)
    send_job_ended_task(celery_app, settings, outbox_id)  # the same message delivered twice
    assert deliver_job_ended(redis_url, settings, factory, celery_app) == [True, False]
    assert training_messages(redis_url, settings) == [waiting]  # sent once
    [row] = outbox_rows(factory, running)
    assert row.handled_at is not None


def test_a_refused_dispatch_leaves_the_end_unhandled(announcing_factory, settings, redis_url):
    factory, celery_app = announcing_factory
    running, outbox_id, waiting = end_running_job(factory)
    down = make_celery(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))  # nothing listens there
    down.conf.broker_connection_max_retries = 0
    down.conf.broker_connection_timeout = 1
    try:
        assert not handle_job_ended(factory, down, settings, outbox_id)
    finally:
        down.close()
    assert outbox_rows(factory, running)[0].handled_at is None
    with session_scope(factory) as session:
        assert session.scalar(select(Job.enqueued_at).where(Job.id == waiting)) is None
    # The message comes again (the sweeper's resend) with the broker back: handled.
    assert handle_job_ended(factory, celery_app, settings, outbox_id)
    assert training_messages(redis_url, settings) == [waiting]


def test_an_end_with_the_project_at_its_limit_dispatches_nothing_more(announcing_factory, settings, redis_url):
    factory, celery_app = announcing_factory
    """Handling respects the project's share: the running job of another end still holds the one slot."""
    ended = make_job(factory, JobStatus.QUEUED)
    make_job(factory, JobStatus.RUNNING, worker_id="w2", heartbeat_at=time.time(), attempt=1)
    make_job(factory, JobStatus.QUEUED)
    with factory() as session:
        mark_enqueued(session, ended)
        session.commit()
        assert cancel_job(session, ended)
        session.commit()
    assert deliver_job_ended(redis_url, settings, factory, celery_app) == [True]
    assert training_messages(redis_url, settings) == []
