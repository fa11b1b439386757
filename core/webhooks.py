"""Webhooks: a project's endpoints are told when its jobs end, signed the Standard Webhooks way.

    core/job_events.py handle_job_ended, in the transaction that marks the job's end handled:
        `write_deliveries`: one event, one `webhook_deliveries` row per enabled endpoint subscribed to its type
        (unique per (outbox row, endpoint): a job end handled twice cannot deliver twice)
    after that commit: qlora.deliver_webhook(delivery id) on the control queue (core/queue.py)
        -> `attempt_delivery`: claim the attempt (a conditional UPDATE: one at a time, only when due), resolve and
           check the URL (core/webhook_urls.py), POST the body signed with a fresh timestamp and the delivery's one
           `webhook-id`, log the attempt; on failure the next attempt is due after the next step of
           QLORA_WEBHOOK_RETRY_SCHEDULE_S: a short wait rides on a Celery countdown, a long one waits in the
           database for the sweeper (`due_for_send`), which also sends again a delivery whose message was lost.

At least once: an attempt whose answer was a 2xx is recorded as delivered; a worker killed between the answer and
the record leaves the claim to lapse, and the delivery is attempted again with the same `webhook-id` (receivers
deduplicate on it). An endpoint whose deliveries keep failing is disabled, with its reason (`record_attempt`).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from core import ids
from core.db import session_scope
from core.settings import Settings
from core.tables import Job, JobOutbox, WebhookAttempt, WebhookDelivery, WebhookEndpoint, now
from core.webhook_urls import UrlRefused, checked_addresses

log = logging.getLogger(__name__)

# OpenAI's fine-tuning events, by the terminal status that makes each.
EVENT_TYPES = {"succeeded": "fine_tuning.job.succeeded", "failed": "fine_tuning.job.failed", "cancelled": "fine_tuning.job.cancelled"}

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# How long past its timeout a claimed attempt holds its delivery: a worker killed mid-attempt frees it after this.
_LEASE_MARGIN_S = 30.0
_MAX_ERROR_CHARS = 500


def new_secret() -> str:
    """A signing secret in Standard Webhooks' form: whsec_ and the base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_hint(secret: str) -> str:
    return f"whsec_...{secret[-4:]}"


def event_body(event_id: str, event_type: str, created_at: int, job_id: str) -> str:
    """OpenAI's event object as the exact text that is signed and sent."""
    return json.dumps({"id": event_id, "object": "event", "type": event_type, "created_at": created_at, "data": {"id": job_id}},
                      separators=(",", ":"))


def signed_headers(delivery_id: str, body: str, secrets_: list[str], at: float) -> dict[str, str]:
    """Standard Webhooks' headers: the delivery's id, the attempt's time, and a `v1,` signature by each secret."""
    timestamp = datetime.fromtimestamp(int(at), tz=UTC)
    signatures = " ".join(Webhook(secret).sign(delivery_id, timestamp, body) for secret in secrets_)
    return {"webhook-id": delivery_id, "webhook-timestamp": str(int(at)), "webhook-signature": signatures,
            "content-type": "application/json", "user-agent": "qlora-webhooks"}


# --- writing the deliveries of a job's end ---------------------------------------------------------------------

def write_deliveries(session: Session, settings: Settings, outbox_id: str) -> list[str]:
    """In the caller's transaction (the one that marks the job's end handled): the event of outbox row `outbox_id`
    and one pending delivery per enabled endpoint of the job's project subscribed to its type. Returns their ids."""
    row = session.execute(select(JobOutbox.status, JobOutbox.created_at, Job.id, Job.project)
                          .join(Job, Job.id == JobOutbox.job_id).where(JobOutbox.id == outbox_id)).one_or_none()
    if row is None or row.status not in EVENT_TYPES:
        return []
    event_type = EVENT_TYPES[row.status]
    endpoints = [endpoint for endpoint in session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.project == row.project, WebhookEndpoint.enabled.is_(True)).order_by(WebhookEndpoint.seq))
        if event_type in endpoint.event_types]
    if not endpoints:
        return []
    event_id = ids.webhook_event_id()
    body = event_body(event_id, event_type, int(row.created_at), row.id)
    first = settings.webhook_retry_schedule_s[0]
    sent_at = time.time() if first <= settings.webhook_countdown_max_s else None  # its task is sent after the commit
    deliveries = [WebhookDelivery(id=ids.webhook_message_id(), endpoint_id=endpoint.id, outbox_id=outbox_id, event_id=event_id,
                                  event_type=event_type, body=body, status=PENDING, attempts=0, next_attempt_at=time.time() + first,
                                  sent_at=sent_at, created_at=now()) for endpoint in endpoints]
    session.add_all(deliveries)
    return [delivery.id for delivery in deliveries]


# --- one attempt -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What one attempt got: a status code, or the error that stood in its way; and how long it took."""

    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(url: str, body: str, headers: dict[str, str], settings: Settings) -> Outcome:
    """POST `body` to `url` once: resolved and checked now, connected to a checked address (never re-resolved by
    the HTTP client), no redirect followed (a 3xx is a failure), no proxy from the environment, the answer's body
    not read."""
    started = time.monotonic()

    def done(status_code: int | None = None, error: str | None = None) -> Outcome:
        return Outcome(status_code, error[:_MAX_ERROR_CHARS] if error else None, int((time.monotonic() - started) * 1000))

    try:
        parts, addresses = checked_addresses(url, settings.webhook_allowed_networks)
    except UrlRefused as exc:
        return done(error=f"refused by the URL policy: {exc}")
    host = parts.hostname or ""
    port = parts.port
    error = "no address"
    for address in addresses:
        literal = f"[{address}]" if ":" in address else address
        pinned = parts._replace(netloc=f"{literal}:{port}" if port else literal).geturl()
        request_headers = {**headers, "host": parts.netloc.rsplit("@", 1)[-1]}
        try:
            with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
                with client.stream("POST", pinned, content=body.encode(), headers=request_headers,
                                   extensions={"sni_hostname": host}) as response:
                    return done(status_code=response.status_code)
        except httpx.TimeoutException:
            return done(error=f"timed out after {settings.webhook_timeout_s:g} s")
        except httpx.ConnectError as exc:
            error = f"could not connect to {address}: {exc}"  # the next address may answer
        except httpx.HTTPError as exc:
            return done(error=f"{type(exc).__name__}: {exc}")
    return done(error=error)


def attempt_delivery(session_factory: sessionmaker[Session], settings: Settings, delivery_id: str) -> float | None:
    """Make the due attempt of delivery `delivery_id`, if it is pending, due and not being attempted elsewhere.
    Returns the seconds until its next attempt when that one should ride on a countdown (None: delivered, failed
    for good, not due, or the next attempt waits for the sweeper)."""
    at = time.time()
    with session_scope(session_factory) as session:
        claimed = session.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= at,
            WebhookDelivery.lease_until.is_(None) | (WebhookDelivery.lease_until < at),
        ).values(lease_until=at + settings.webhook_timeout_s + _LEASE_MARGIN_S, attempts=WebhookDelivery.attempts + 1)
            .execution_options(synchronize_session=False)).rowcount == 1
        if not claimed:
            return None
        delivery = session.scalars(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)).one()
        endpoint = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.id == delivery.endpoint_id)).one()
        if not endpoint.enabled:
            delivery.status, delivery.lease_until, delivery.finished_at = FAILED, None, now()
            session.add(WebhookAttempt(delivery_id=delivery_id, attempted_at=at, duration_ms=0, status_code=None,
                                       error=f"not attempted: the endpoint is disabled ({endpoint.disabled_reason or 'by the project'})"))
            return None
        url, body, attempt = endpoint.url, delivery.body, delivery.attempts
        signing = [endpoint.secret]
        if endpoint.previous_secret and (endpoint.previous_secret_until or 0) > at:
            signing.append(endpoint.previous_secret)
    outcome = post(url, body, signed_headers(delivery_id, body, signing, time.time()), settings)
    log.info("webhook %s attempt %d to endpoint %s: %s", delivery_id, attempt, endpoint.id,
             outcome.status_code if outcome.status_code is not None else outcome.error)
    with session_scope(session_factory) as session:
        return record_attempt(session, settings, delivery_id, attempt, at, outcome)


def deliver(session_factory: sessionmaker[Session], celery_app: Any, settings: Settings, delivery_id: str) -> None:
    """What qlora.deliver_webhook does: the due attempt, and the next one's message when it rides on a countdown."""
    delay = attempt_delivery(session_factory, settings, delivery_id)
    if delay is not None:
        send_deliveries(celery_app, settings, [delivery_id], countdown=delay)


def record_attempt(session: Session, settings: Settings, delivery_id: str, attempt: int, at: float, outcome: Outcome) -> float | None:
    """Log the attempt and move the delivery on: delivered, due again after the schedule's next step, or failed for
    good once every attempt is used; keep the endpoint's run of failures and disable it when the run is too long."""
    delivery = session.scalars(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)).one_or_none()
    if delivery is None:
        return None  # deleted with its endpoint meanwhile: nothing to log it under
    session.add(WebhookAttempt(delivery_id=delivery_id, attempted_at=at, duration_ms=outcome.duration_ms,
                               status_code=outcome.status_code, error=outcome.error))
    if delivery.status != PENDING or delivery.attempts != attempt:
        return None  # (a lapsed claim) attempted again since, by another worker
    endpoint = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.id == delivery.endpoint_id).with_for_update()).one()
    delivery.lease_until = None
    if outcome.ok:
        delivery.status, delivery.finished_at, delivery.next_attempt_at = DELIVERED, now(), None
        endpoint.failed_deliveries_in_a_row, endpoint.failing_since = 0, None
        return None
    if endpoint.failing_since is None:
        endpoint.failing_since = at
    schedule = settings.webhook_retry_schedule_s
    if attempt < len(schedule):
        delay = schedule[attempt]
        delivery.next_attempt_at = time.time() + delay
        countdown = delay <= settings.webhook_countdown_max_s
        delivery.sent_at = time.time() if countdown else None  # None: the sweeper sends it once due
        reason = _disable_reason(settings, endpoint, time.time())
        if reason:
            _disable(endpoint, reason)
        return delay if countdown else None
    delivery.status, delivery.finished_at, delivery.next_attempt_at = FAILED, now(), None
    endpoint.failed_deliveries_in_a_row += 1
    reason = _disable_reason(settings, endpoint, time.time())
    if reason:
        _disable(endpoint, reason)
    return None


def _disable_reason(settings: Settings, endpoint: WebhookEndpoint, at: float) -> str | None:
    if endpoint.failed_deliveries_in_a_row >= settings.webhook_disable_after_failed_deliveries:
        return (f"Disabled: {endpoint.failed_deliveries_in_a_row} deliveries in a row failed every attempt "
                "(QLORA_WEBHOOK_DISABLE_AFTER_FAILED_DELIVERIES).")
    if endpoint.failing_since is not None and at - endpoint.failing_since >= settings.webhook_disable_after_s:
        return f"Disabled: every attempt failed for {(at - endpoint.failing_since) / 3600:.1f} hours (QLORA_WEBHOOK_DISABLE_AFTER_S)."
    return None


def _disable(endpoint: WebhookEndpoint, reason: str) -> None:
    if endpoint.enabled:
        log.warning("webhook endpoint %s of project %s: %s", endpoint.id, endpoint.project, reason)
    endpoint.enabled, endpoint.disabled_reason, endpoint.updated_at = False, reason, now()


# --- the sweeper's part ----------------------------------------------------------------------------------------

def due_for_send(session: Session, settings: Settings, at: float | None = None) -> list[str]:
    """The pending deliveries whose task the sweeper sends, by Unix time `at`: those due whose wait was left to it
    (`sent_at` None), and those due `webhook_resend_after_s` ago whose message was sent as long ago and not taken
    (lost). A delivery being attempted (its claim not lapsed) is left alone."""
    at = time.time() if at is None else at
    cutoff = at - settings.webhook_resend_after_s
    return list(session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.status == PENDING,
        WebhookDelivery.lease_until.is_(None) | (WebhookDelivery.lease_until < at),
        (WebhookDelivery.sent_at.is_(None) & (WebhookDelivery.next_attempt_at <= at))
        | ((WebhookDelivery.next_attempt_at <= cutoff) & (WebhookDelivery.sent_at <= cutoff)),
    ).order_by(WebhookDelivery.seq)))


def mark_sent(session: Session, delivery_id: str) -> None:
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(sent_at=time.time()))


def send_deliveries(celery_app: Any, settings: Settings, delivery_ids: list[str], countdown: float) -> None:
    """Send each delivery's task; a send the broker refuses is logged, and the sweeper sends it later."""
    from core.queue import send_webhook_task

    for delivery_id in delivery_ids:
        try:
            send_webhook_task(celery_app, settings, delivery_id, countdown=countdown)
        except Exception as exc:
            log.warning("could not send webhook delivery %s (%s); the sweeper sends it again", delivery_id, type(exc).__name__)
