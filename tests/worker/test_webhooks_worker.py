"""Webhooks through a real Celery worker (prefork, PostgreSQL, Redis): a job's succeeded, failed and cancelled events
reach a receiver on 127.0.0.1 that was down for their first attempts, each once, with the webhook-id of the failed
attempt, and pass the official SDK's `client.webhooks.unwrap`."""

from __future__ import annotations

import time

import openai
import redis
from sqlalchemy import select

from core.db import make_engine, make_session_factory, session_scope
from core.jobs import cancel_job, claim_job, fail_job, succeed_job
from core.queue import control_queue
from core.storage import LocalStorage
from core.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, now
from core.webhooks import EVENT_TYPES, new_secret
from tests.job_ended import announcing
from tests.webhook_receiver import Receiver
from tests.worker.helpers import PROJECT, create_job, wait_until
from tests.worker.test_celery_worker import celery_worker, make_worker_settings


def test_the_three_events_reach_a_receiver_that_was_down_once_each(postgres_url, redis_url, models_dir, tmp_path):
    settings = make_worker_settings(tmp_path, models_dir, postgres_url, redis_url).model_copy(
        update={"webhook_allowed_networks": "127.0.0.0/8", "webhook_retry_schedule_s": [0, 1, 1, 1], "sweep_interval_s": 60})
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    storage = LocalStorage(settings.storage_dir)
    receiver = Receiver().up()
    receiver.down()  # its port is known and refuses connections
    secret = new_secret()
    jobs = {status: create_job(factory, storage) for status in EVENT_TYPES}
    with session_scope(factory) as session:
        session.add(WebhookEndpoint(id="we_test", project=PROJECT, name="app", url=receiver.url, event_types=list(EVENT_TYPES.values()),
                                    secret=secret, enabled=True, failed_deliveries_in_a_row=0, created_at=now(), updated_at=now()))
    log_path = tmp_path / "worker.log"
    try:
        with announcing(factory, settings, redis_url):
            with session_scope(factory) as session:
                assert claim_job(session, jobs["succeeded"], "worker-1")
                assert succeed_job(session, jobs["succeeded"], "worker-1", fine_tuned_model="ft:x", trained_tokens=1, result_files=[])
                assert fail_job(session, jobs["failed"], code="invalid_training_file", message="bad")
                assert cancel_job(session, jobs["cancelled"])
            with celery_worker(settings, "worker.celery_app", log_path):
                def attempts() -> list[tuple[str, int | None]]:
                    with session_scope(factory) as session:
                        return list(session.execute(select(WebhookAttempt.delivery_id, WebhookAttempt.status_code)))

                wait_until(lambda: len({delivery for delivery, _ in attempts()}) == 3, 90, interval_s=0.2, message="a first attempt of each")
                receiver.up()
                wait_until(lambda: len(receiver.received) == 3, 30, interval_s=0.1, message="the three deliveries")
                time.sleep(2.5)  # past two more steps of the schedule: nothing more arrives
            assert len(receiver.received) == 3
    finally:
        receiver.down()
        redis.Redis.from_url(redis_url).delete(control_queue(settings), f"_kombu.binding.{control_queue(settings)}")
        engine.dispose()

    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    seen = {}
    for request in receiver.received:
        event = sdk.webhooks.unwrap(request.body, request.headers, secret=secret)
        seen[event.type] = (event.data.id, request.headers["webhook-id"])
    assert {kind: job_id for kind, (job_id, _) in seen.items()} == {EVENT_TYPES[status]: job_id for status, job_id in jobs.items()}
    with session_scope(make_session_factory(engine)) as session:
        for kind, (_, webhook_id) in seen.items():
            delivery = session.scalars(select(WebhookDelivery).where(WebhookDelivery.event_type == kind)).one()
            codes = list(session.scalars(select(WebhookAttempt.status_code).where(WebhookAttempt.delivery_id == delivery.id)
                                         .order_by(WebhookAttempt.seq)))
            assert delivery.id == webhook_id and delivery.status == "delivered"
            assert codes[0] is None and codes[-1] == 200 and codes.count(200) == 1  # refused first, then one success
