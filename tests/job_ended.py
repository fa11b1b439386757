"""The consumer side of "a job ended" for tests: the qlora.job_ended messages waiting on a Redis control queue, and a
stand-in for the control worker that takes them off the queue and runs the task's function (core/job_events.py); and
one that serves the control queue's job-ended and webhook messages, countdowns included (core/webhooks.py), until a
condition holds."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import webhooks
from core.db import session_scope
from core.job_events import handle_job_ended, send_on_commit
from core.queue import JOB_ENDED_TASK, WEBHOOK_TASK, control_queue, make_celery
from core.settings import Settings
from core.tables import JobOutbox


@contextmanager
def announcing(session_factory: sessionmaker[Session], settings: Settings, redis_url: str) -> Iterator[Any]:
    """A Celery app on `settings`' Redis broker, with every commit of `session_factory` announcing the job ends it
    wrote (as worker/tasks.py and api/main.py set it up); on the way out the app is closed and its queues deleted."""
    app = make_celery(settings)
    send_on_commit(session_factory, app, settings)
    try:
        yield app
    finally:
        app.close()
        queues = (settings.task_queue, control_queue(settings))
        redis.Redis.from_url(redis_url).delete(*queues, *(f"_kombu.binding.{q}" for q in queues))


def job_ended_messages(redis_url: str, settings: Settings) -> list[str]:
    """The outbox ids of the qlora.job_ended messages waiting, oldest first (kombu pushes on the left)."""
    client = redis.Redis.from_url(redis_url)
    found = []
    for raw in reversed(client.lrange(control_queue(settings), 0, -1)):
        message = json.loads(raw)
        if message["headers"]["task"] == JOB_ENDED_TASK:
            found.append(json.loads(base64.b64decode(message["body"]))[0][0])
    return found


def deliver_job_ended(redis_url: str, settings: Settings, session_factory: sessionmaker[Session], celery_app: Any) -> list[bool]:
    """Take every waiting message off the control queue, oldest first, and handle it as the control worker would;
    returns what each handling returned."""
    client = redis.Redis.from_url(redis_url)
    outcomes = []
    while (raw := client.rpop(control_queue(settings))) is not None:
        message = json.loads(raw)
        if message["headers"]["task"] == JOB_ENDED_TASK:
            outbox_id = json.loads(base64.b64decode(message["body"]))[0][0]
            outcomes.append(handle_job_ended(session_factory, celery_app, settings, outbox_id))
    return outcomes


def outbox_rows(session_factory: sessionmaker[Session], job_id: str) -> list[JobOutbox]:
    with session_scope(session_factory) as session:
        return list(session.scalars(select(JobOutbox).where(JobOutbox.job_id == job_id).order_by(JobOutbox.seq)))


def serve_control_queue(redis_url: str, settings: Settings, session_factory: sessionmaker[Session], celery_app: Any,
                        until: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Serve the control queue as the control worker would (qlora.job_ended and qlora.deliver_webhook, each message
    run once its countdown is over) until `until()` holds; AssertionError after `timeout_s`."""
    client = redis.Redis.from_url(redis_url)
    held: list[tuple[float, str, str]] = []  # (due, task, argument) of the messages whose countdown is running
    deadline = time.monotonic() + timeout_s
    check_at = 0.0
    while True:
        if time.monotonic() >= check_at:  # the condition may read the database: not at every turn
            if until():
                return
            check_at = time.monotonic() + 0.05
        if time.monotonic() > deadline:
            raise AssertionError(f"the control queue did not reach the condition in {timeout_s} s")
        while (raw := client.rpop(control_queue(settings))) is not None:
            message = json.loads(raw)
            eta = message["headers"].get("eta")
            due = datetime.fromisoformat(eta).timestamp() if eta else 0.0
            held.append((due, message["headers"]["task"], json.loads(base64.b64decode(message["body"]))[0][0]))
        held.sort()
        if held and held[0][0] <= time.time():
            _, task, argument = held.pop(0)
            if task == JOB_ENDED_TASK:
                handle_job_ended(session_factory, celery_app, settings, argument)
            elif task == WEBHOOK_TASK:
                webhooks.deliver(session_factory, celery_app, settings, argument)
            check_at = 0.0
            continue
        time.sleep(0.02)
