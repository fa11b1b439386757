"""Webhook endpoints over /v1/webhook_endpoints with the official SDK (`client.webhooks`, strict), and the events of
a job's end reaching a real HTTP receiver on 127.0.0.1: through the API's commit, the job-ended message on Redis, and
the control queue served by tests/job_ended.py's stand-in for the control worker (the real worker runs it in
tests/worker/test_webhooks_worker.py). The schedule is shrunk to fractions of a second by its setting. PostgreSQL
only, but for the endpoints and the events themselves, which run on SQLite too."""

from __future__ import annotations

import time

import openai
import pytest
import redis
from sqlalchemy import func, select

from core import webhook_urls
from core.jobs import claim_job, fail_job, succeed_job
from core.queue import control_queue
from core.tables import WebhookDelivery
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, KEY_B, assert_error, create_job_ok, db, upload_ok
from tests.job_ended import deliver_job_ended, serve_control_queue
from tests.webhook_receiver import Receiver
from worker.sweeper import sweep

ALL_EVENTS = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


@pytest.fixture
def database_url(request):
    """PostgreSQL; the tests marked BOTH_DATABASES run on SQLite (the embedded mode) too."""
    return request.getfixturevalue(f"{getattr(request, 'param', 'postgres')}_url")


BOTH_DATABASES = pytest.mark.parametrize("database_url", ["postgres", "sqlite"], indirect=True)


@pytest.fixture
def settings(tmp_path, database_url, redis_url, queue_name, models_dir):
    return make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, webhook_allowed_networks="127.0.0.0/8",
                         webhook_retry_schedule_s=[0, 0.2, 0.2], webhook_timeout_s=2, webhook_disable_after_failed_deliveries=2,
                         webhook_max_endpoints_per_project=3)


@pytest.fixture
def sdk(client):
    return openai.OpenAI(api_key="key-a", base_url="http://testserver/v1", http_client=client, max_retries=0,
                         _strict_response_validation=True)


@pytest.fixture
def receiver():
    receiver = Receiver().up()
    yield receiver
    receiver.down()


def serve(client, settings, redis_url, until, timeout_s: float = 15.0) -> None:  # noqa: ANN001
    serve_control_queue(redis_url, settings, client.app.state.session_factory, client.app.state.celery, until, timeout_s)


def end_job(client, how: str) -> str:  # noqa: ANN001
    """A job of project A ended `how`, as its worker or the API ends it (the commit announces the end)."""
    job_id = create_job_ok(client, upload_ok(client)["id"])["id"]
    if how == "cancelled":
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=KEY_A).status_code == 200
        return job_id
    with db(client) as session:
        assert claim_job(session, job_id, "worker-1")
    with db(client) as session:
        if how == "succeeded":
            assert succeed_job(session, job_id, "worker-1", fine_tuned_model="ft:x", trained_tokens=1, result_files=[])
        else:
            assert fail_job(session, job_id, code="invalid_training_file", message="bad")
    return job_id


def deliveries(client, endpoint_id: str) -> list[dict]:  # noqa: ANN001
    answer = client.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries", headers=KEY_A)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def statuses(client, endpoint_id: str) -> list[str]:  # noqa: ANN001
    """The endpoint's deliveries' statuses, oldest first, read from the database (a condition polled often)."""
    with db(client) as session:
        return list(session.scalars(select(WebhookDelivery.status).where(WebhookDelivery.endpoint_id == endpoint_id)
                                    .order_by(WebhookDelivery.seq)))


def attempted(client, endpoint_id: str) -> bool:  # noqa: ANN001
    with db(client) as session:
        return bool(session.scalar(select(func.sum(WebhookDelivery.attempts)).where(WebhookDelivery.endpoint_id == endpoint_id)))


@BOTH_DATABASES
def test_endpoints_over_the_sdk(sdk, client):
    created = sdk.webhooks.create(url="http://127.0.0.1:9/a", event_types=["fine_tuning.job.succeeded"], name="ci")
    assert created.signing_secret.startswith("whsec_") and created.signing_secret_hint.endswith(created.signing_secret[-4:])
    assert created.model_extra["enabled"] is True and created.model_extra["disabled_reason"] is None
    got = sdk.webhooks.retrieve(created.id)
    assert (got.url, got.event_types, got.name) == ("http://127.0.0.1:9/a", ["fine_tuning.job.succeeded"], "ci")
    assert "signing_secret" not in client.get(f"/v1/webhook_endpoints/{created.id}", headers=KEY_A).json()  # shown once
    second = sdk.webhooks.create(url="http://127.0.0.1:9/b", event_types=ALL_EVENTS, name="all")
    assert [e.id for e in sdk.webhooks.list(limit=1)] == [second.id, created.id]  # newest first, over two pages

    updated = sdk.webhooks.update(created.id, url="http://127.0.0.1:9/c", event_types=["fine_tuning.job.failed"])
    assert (updated.url, updated.event_types) == ("http://127.0.0.1:9/c", ["fine_tuning.job.failed"])
    off = client.post(f"/v1/webhook_endpoints/{created.id}", headers=KEY_A, json={"enabled": False}).json()
    assert (off["enabled"], off["disabled_reason"]) == (False, "Disabled by the project.")
    on = client.post(f"/v1/webhook_endpoints/{created.id}", headers=KEY_A, json={"enabled": True}).json()
    assert (on["enabled"], on["disabled_reason"]) == (True, None)
    rotated = sdk.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret != created.signing_secret

    # Another project sees none of it.
    assert client.get("/v1/webhook_endpoints", headers=KEY_B).json()["data"] == []
    assert_error(client.get(f"/v1/webhook_endpoints/{created.id}", headers=KEY_B), 404, code="webhook_endpoint_not_found",
                 param="webhook_endpoint_id")
    assert_error(client.delete(f"/v1/webhook_endpoints/{created.id}", headers=KEY_B), 404, code="webhook_endpoint_not_found",
                 param="webhook_endpoint_id")
    assert sdk.webhooks.delete(created.id).deleted is True
    assert_error(client.get(f"/v1/webhook_endpoints/{created.id}/deliveries", headers=KEY_A), 404, code="webhook_endpoint_not_found",
                 param="webhook_endpoint_id")


def test_bad_requests_and_the_cap(client):
    def create(**body):  # noqa: ANN003, ANN202
        return client.post("/v1/webhook_endpoints", headers=KEY_A, json={"url": "http://127.0.0.1:9/", "event_types": ALL_EVENTS} | body)

    assert_error(create(event_types=["fine_tuning.job.paused"]), 400, code="invalid_value", param="event_types.0")
    assert_error(create(event_types=[]), 400, code="invalid_value", param="event_types")
    assert_error(create(url=None), 400, code="invalid_type", param="url")
    assert_error(create(secret="mine"), 400, code="unknown_parameter", param="secret")
    assert_error(create(name="a\x00b"), 400, code="invalid_value", param="name")
    for _ in range(3):
        assert create().status_code == 200
    assert_error(create(), 429, code="quota_exceeded", type="quota_error")
    assert create.__name__ and client.post("/v1/webhook_endpoints", headers=KEY_B,
                                           json={"url": "http://127.0.0.1:9/", "event_types": ALL_EVENTS}).status_code == 200


REFUSED_URLS = [
    "http://169.254.169.254/latest/meta-data/",  # link-local: cloud metadata, refused even where loopback is allowed
    "http://[fe80::1]/hook",
    "http://[::ffff:169.254.169.254]/",  # the same address, IPv4-mapped
    "http://10.1.2.3/hook",  # private, not in the allowed networks
    "http://[::1]:8080/hook",  # loopback, but only 127.0.0.0/8 is allowed here
    "http://0.0.0.0:8080/",
    "ftp://127.0.0.1/hook",
    "file:///etc/passwd",
    "http://user:pw@127.0.0.1/hook",
    "http://no-such-host.invalid/hook",
]


def test_the_url_policy_at_creation_and_update(client):
    endpoint = client.post("/v1/webhook_endpoints", headers=KEY_A, json={"url": "http://93.184.216.34/hook", "event_types": ALL_EVENTS})
    assert endpoint.status_code == 200  # a public address
    for url in REFUSED_URLS:
        assert_error(client.post("/v1/webhook_endpoints", headers=KEY_A, json={"url": url, "event_types": ALL_EVENTS}), 400,
                     code="invalid_url", param="url")
        assert_error(client.post(f"/v1/webhook_endpoints/{endpoint.json()['id']}", headers=KEY_A, json={"url": url}), 400,
                     code="invalid_url", param="url")
    assert client.get(f"/v1/webhook_endpoints/{endpoint.json()['id']}", headers=KEY_A).json()["url"] == "http://93.184.216.34/hook"


@BOTH_DATABASES
def test_each_end_reaches_the_receiver_once_and_unwraps(sdk, client, settings, redis_url, receiver):
    endpoint = sdk.webhooks.create(url=receiver.url, event_types=ALL_EVENTS, name="app")
    ended = {how: end_job(client, how) for how in ("succeeded", "failed", "cancelled")}
    serve(client, settings, redis_url, lambda: len(receiver.received) >= 3)
    time.sleep(0.5)
    serve(client, settings, redis_url, lambda: True)  # whatever is due now runs: nothing more arrives
    assert len(receiver.received) == 3
    seen = {}
    for request in receiver.received:
        event = sdk.webhooks.unwrap(request.body, request.headers, secret=endpoint.signing_secret)
        assert event.object == "event" and event.id.startswith("evt_")
        seen[event.type] = event.data.id
        with pytest.raises(openai.InvalidWebhookSignatureError):
            sdk.webhooks.unwrap(request.body.replace(b'"data"', b'"data" '), request.headers, secret=endpoint.signing_secret)
        with pytest.raises(openai.InvalidWebhookSignatureError):
            sdk.webhooks.unwrap(request.body, request.headers, secret=sdk.webhooks.rotate_secret(endpoint.id).signing_secret)
    assert seen == {f"fine_tuning.job.{how}": job_id for how, job_id in ended.items()}
    log = deliveries(client, endpoint.id)
    assert sorted((d["event_type"], d["job_id"], d["status"], len(d["attempts"])) for d in log) == sorted(
        (f"fine_tuning.job.{how}", job_id, "delivered", 1) for how, job_id in ended.items())
    assert all(d["attempts"][0]["status_code"] == 200 and d["attempts"][0]["error"] is None for d in log)
    assert sorted(d["id"] for d in log) == sorted(r.headers["webhook-id"] for r in receiver.received)


def test_a_receiver_down_for_its_first_attempts_gets_the_event_once(sdk, client, settings, redis_url, receiver):
    endpoint = sdk.webhooks.create(url=receiver.url, event_types=["fine_tuning.job.cancelled"], name="app")
    receiver.down()  # first attempt: connection refused
    job_id = end_job(client, "cancelled")
    serve(client, settings, redis_url, lambda: attempted(client, endpoint.id))
    receiver.up()
    receiver.status = 500  # second attempt: a server error
    serve(client, settings, redis_url, lambda: len(receiver.received) == 1)
    receiver.status = 200  # third: delivered
    serve(client, settings, redis_url, lambda: len(receiver.ok()) == 1)
    [delivery] = deliveries(client, endpoint.id)
    assert delivery["status"] == "delivered" and delivery["next_attempt_at"] is None
    first, second, third = delivery["attempts"]
    assert first["status_code"] is None and "could not connect" in first["error"]
    assert (second["status_code"], third["status_code"]) == (500, 200)
    assert len({r.headers["webhook-id"] for r in receiver.received} | {delivery["id"]}) == 1  # one webhook-id throughout
    assert sdk.webhooks.unwrap(receiver.ok()[0].body, receiver.ok()[0].headers, secret=endpoint.signing_secret).data.id == job_id


def test_an_endpoint_that_keeps_failing_is_disabled_saying_why(sdk, client, settings, redis_url, receiver):
    endpoint = sdk.webhooks.create(url=receiver.url, event_types=ALL_EVENTS, name="app")
    receiver.status = 500
    for n in (1, 2):
        end_job(client, "cancelled")
        serve(client, settings, redis_url, lambda: statuses(client, endpoint.id) == ["failed"] * n)  # noqa: B023
    assert len(receiver.received) == 2 * 3  # every attempt of both
    got = client.get(f"/v1/webhook_endpoints/{endpoint.id}", headers=KEY_A).json()
    assert got["enabled"] is False and "2 deliveries in a row failed" in got["disabled_reason"]
    end_job(client, "cancelled")  # nothing is delivered to a disabled endpoint
    serve(client, settings, redis_url, lambda: not redis.Redis.from_url(redis_url).llen(control_queue(settings)))
    assert len(deliveries(client, endpoint.id)) == 2 and len(receiver.received) == 6
    receiver.status = 200
    client.post(f"/v1/webhook_endpoints/{endpoint.id}", headers=KEY_A, json={"enabled": True})
    end_job(client, "cancelled")
    serve(client, settings, redis_url, lambda: len(receiver.ok()) == 1)


def test_a_redirect_is_not_followed(sdk, client, settings, redis_url, receiver):
    target = Receiver().up()
    try:
        endpoint = sdk.webhooks.create(url=receiver.url, event_types=ALL_EVENTS, name="app")
        receiver.status, receiver.location = 307, target.url
        end_job(client, "cancelled")
        serve(client, settings, redis_url, lambda: statuses(client, endpoint.id) == ["failed"])
        assert [r.answered for r in receiver.received] == [307] * 3 and target.received == []
    finally:
        target.down()


def test_dns_rebinding_is_refused_at_delivery(sdk, client, settings, redis_url, receiver, monkeypatch):
    answers = {"hooks.example.test": ["93.184.216.34"]}
    monkeypatch.setattr(webhook_urls, "_resolver", lambda host, port: answers[host])
    endpoint = sdk.webhooks.create(url="http://hooks.example.test/x", event_types=ALL_EVENTS, name="app")  # public when created
    answers["hooks.example.test"] = ["169.254.169.254"]  # the name now points at the metadata service
    end_job(client, "cancelled")
    serve(client, settings, redis_url, lambda: statuses(client, endpoint.id) == ["failed"])
    [delivery] = deliveries(client, endpoint.id)
    assert all("refused by the URL policy" in a["error"] and "link-local" in a["error"] for a in delivery["attempts"])


def test_a_job_end_handled_twice_or_a_lost_message_delivers_once(sdk, client, settings, redis_url, receiver):
    sdk.webhooks.create(url=receiver.url, event_types=ALL_EVENTS, name="app")
    end_job(client, "cancelled")
    factory, celery_app = client.app.state.session_factory, client.app.state.celery
    [outbox_id] = [args[0] for task, args in _messages(redis_url, settings) if task == "qlora.job_ended"]
    assert deliver_job_ended(redis_url, settings, factory, celery_app) == [True]
    from core.job_events import handle_job_ended

    assert handle_job_ended(factory, celery_app, settings, outbox_id) is False  # redelivered: nothing new
    with db(client) as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
    redis.Redis.from_url(redis_url).delete(control_queue(settings))  # the delivery's message is lost
    assert sweep(settings.model_copy(update={"webhook_resend_after_s": 3600}), factory, celery_app)["sent_webhooks"] == []
    assert len(sweep(settings.model_copy(update={"webhook_resend_after_s": 0}), factory, celery_app)["sent_webhooks"]) == 1
    serve(client, settings, redis_url, lambda: len(receiver.ok()) == 1)
    assert sweep(settings.model_copy(update={"webhook_resend_after_s": 0}), factory, celery_app)["sent_webhooks"] == []


def test_a_long_wait_is_left_to_the_sweeper(sdk, client, settings, redis_url, receiver):
    patient = settings.model_copy(update={"webhook_countdown_max_s": 0.1, "webhook_retry_schedule_s": [0, 0.5]})
    factory, celery_app = client.app.state.session_factory, client.app.state.celery
    endpoint = sdk.webhooks.create(url=receiver.url, event_types=ALL_EVENTS, name="app")
    receiver.status = 503
    end_job(client, "cancelled")
    serve_control_queue(redis_url, patient, factory, celery_app, lambda: len(receiver.received) == 1)
    assert redis.Redis.from_url(redis_url).llen(control_queue(settings)) == 0  # no countdown message for the retry
    assert sweep(patient, factory, celery_app)["sent_webhooks"] == []  # not due yet
    receiver.status = 200
    time.sleep(0.5)
    assert len(sweep(patient, factory, celery_app)["sent_webhooks"]) == 1
    serve_control_queue(redis_url, patient, factory, celery_app, lambda: len(receiver.ok()) == 1)
    assert [d["status"] for d in deliveries(client, endpoint.id)] == ["delivered"]


def test_rotation_keeping_the_old_secret_signs_with_both(sdk, client, settings, redis_url, receiver):
    endpoint = sdk.webhooks.create(url=receiver.url, event_types=ALL_EVENTS, name="app")
    rotated = sdk.webhooks.rotate_secret(endpoint.id, keep_old_secret_active_for_24_hours=True)
    end_job(client, "cancelled")
    serve(client, settings, redis_url, lambda: len(receiver.ok()) == 1)
    [request] = receiver.received
    assert len(request.headers["webhook-signature"].split()) == 2
    for secret in (endpoint.signing_secret, rotated.signing_secret):
        assert sdk.webhooks.unwrap(request.body, request.headers, secret=secret).type == "fine_tuning.job.cancelled"


def _messages(redis_url: str, settings) -> list[tuple[str, list]]:  # noqa: ANN001
    from tests.api.helpers import queued_tasks

    return queued_tasks(redis_url, control_queue(settings))


def test_an_attempt_whose_endpoint_was_deleted_meanwhile_is_dropped(sdk, client, settings, redis_url, receiver):
    from core.webhooks import Outcome, record_attempt

    endpoint = sdk.webhooks.create(url=receiver.url, event_types=ALL_EVENTS, name="app")
    end_job(client, "cancelled")
    assert deliver_job_ended(redis_url, settings, client.app.state.session_factory, client.app.state.celery) == [True]
    with db(client) as session:
        [delivery_id] = session.scalars(select(WebhookDelivery.id))
    assert sdk.webhooks.delete(endpoint.id).deleted  # while its first attempt is under way
    with db(client) as session:  # the attempt's answer arrives: nothing to record it under, and no error
        assert record_attempt(session, settings, delivery_id, 1, time.time(), Outcome(200, None, 5)) is None
    with db(client) as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
