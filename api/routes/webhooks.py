"""/v1/webhook_endpoints: a project's webhook endpoints, as the SDK's `client.webhooks` calls them (create, retrieve,
update, list, delete, rotate_secret), plus our extensions: `enabled` / `disabled_reason` on the object, `enabled` in
an update, and GET /v1/webhook_endpoints/{id}/deliveries, the delivery log.

The signing secret is returned at creation and rotation only. A URL is checked against the URL policy
(core/webhook_urls.py) here, and again before every delivery attempt. Deliveries: core/webhooks.py.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.deps import CurrentProject, SessionDep, SettingsDep
from api.errors import bad_request, not_found, quota_exceeded
from api.openapi import error_responses
from api.pagination import fetch_page_after
from api.schemas import (
    CursorPage,
    WebhookDeliveryObject,
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointObject,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
    WebhookRotateSecret,
    first_unstorable,
)
from core import ids
from core.quotas import lock_project
from core.settings import Settings
from core.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, now
from core.webhook_urls import UrlRefused, checked_addresses
from core.webhooks import new_secret

router = APIRouter(prefix="/webhook_endpoints", tags=["webhooks"])

ROTATION_GRACE_S = 24 * 3600


def project_endpoint(session: Session, project: str, endpoint_id: str) -> WebhookEndpoint:
    row = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.project == project))
    if row is None:
        raise not_found(f"No such webhook endpoint: {endpoint_id}", param="webhook_endpoint_id", code="webhook_endpoint_not_found")
    return row


def checked_url(url: str, settings: Settings) -> str:
    """`url` if its form and every address it resolves to now pass the URL policy; else a 400 naming `url`."""
    if first_unstorable(url):
        raise bad_request("Invalid 'url': it contains a character that cannot be stored.", param="url", code="invalid_url")
    try:
        checked_addresses(url, settings.webhook_allowed_networks)
    except UrlRefused as exc:
        raise bad_request(f"Invalid 'url': {exc}", param="url", code="invalid_url") from None
    return url


def checked_name(name: str) -> str:
    if found := first_unstorable(name):
        raise bad_request(f"Invalid 'name': it {found[1]}.", param="name", code="invalid_value")
    return name


@router.post("", response_model=WebhookEndpointWithSecret, summary="Create a webhook endpoint (its secret is shown once)",
             responses=error_responses(429))
def create_endpoint(body: WebhookEndpointCreate, project: CurrentProject, session: SessionDep, settings: SettingsDep) -> WebhookEndpointWithSecret:
    url = checked_url(body.url, settings)
    name = checked_name(body.name)
    lock_project(session, project)  # orders concurrent creations from the count to the commit
    count = session.scalar(select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.project == project)) or 0
    if count >= settings.webhook_max_endpoints_per_project:
        raise quota_exceeded(f"This project has {count} webhook endpoints, the most it may have", "QLORA_WEBHOOK_MAX_ENDPOINTS_PER_PROJECT")
    at = now()
    row = WebhookEndpoint(id=ids.webhook_endpoint_id(), project=project, name=name, url=url, event_types=list(dict.fromkeys(body.event_types)),
                          secret=new_secret(), enabled=True, failed_deliveries_in_a_row=0, created_at=at, updated_at=at)
    session.add(row)
    session.commit()
    return WebhookEndpointWithSecret.from_row(row)


@router.get("", response_model=CursorPage[WebhookEndpointObject], summary="List the project's webhook endpoints, newest first")
def list_endpoints(project: CurrentProject, session: SessionDep, after: str | None = None,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20) -> CursorPage[WebhookEndpointObject]:
    rows, has_more = fetch_page_after(session, WebhookEndpoint, [WebhookEndpoint.project == project], after=after, limit=limit,
                                      newest_first=True)
    return CursorPage[WebhookEndpointObject].of([WebhookEndpointObject.from_row(row) for row in rows], has_more)


@router.get("/{webhook_endpoint_id}", response_model=WebhookEndpointObject, summary="Retrieve a webhook endpoint",
            responses=error_responses(404))
def retrieve_endpoint(webhook_endpoint_id: str, project: CurrentProject, session: SessionDep) -> WebhookEndpointObject:
    return WebhookEndpointObject.from_row(project_endpoint(session, project, webhook_endpoint_id))


@router.post("/{webhook_endpoint_id}", response_model=WebhookEndpointObject, summary="Update a webhook endpoint",
             responses=error_responses(404))
def update_endpoint(webhook_endpoint_id: str, body: WebhookEndpointUpdate, project: CurrentProject, session: SessionDep,
                    settings: SettingsDep) -> WebhookEndpointObject:
    row = project_endpoint(session, project, webhook_endpoint_id)
    changed = False
    if body.url is not None and body.url != row.url:
        row.url, changed = checked_url(body.url, settings), True
    if body.name is not None and body.name != row.name:
        row.name, changed = checked_name(body.name), True
    if body.event_types is not None and list(dict.fromkeys(body.event_types)) != list(row.event_types):
        row.event_types, changed = list(dict.fromkeys(body.event_types)), True
    if body.enabled is not None and body.enabled != row.enabled:
        row.enabled, changed = body.enabled, True
        # Enabled again: its failures are forgiven; disabled by the project: it says so.
        row.disabled_reason = None if body.enabled else "Disabled by the project."
        row.failed_deliveries_in_a_row, row.failing_since = 0, None
    if changed:
        row.updated_at = now()
    session.commit()
    return WebhookEndpointObject.from_row(row)


@router.delete("/{webhook_endpoint_id}", response_model=WebhookEndpointDeleted, summary="Delete a webhook endpoint",
               responses=error_responses(404))
def delete_endpoint(webhook_endpoint_id: str, project: CurrentProject, session: SessionDep) -> WebhookEndpointDeleted:
    row = project_endpoint(session, project, webhook_endpoint_id)
    session.delete(row)  # its deliveries and their attempts go with it (ON DELETE CASCADE)
    session.commit()
    return WebhookEndpointDeleted(id=webhook_endpoint_id, deleted=True)


@router.post("/{webhook_endpoint_id}/rotate_secret", response_model=WebhookEndpointWithSecret,
             summary="Rotate a webhook endpoint's signing secret (the new one is shown once)", responses=error_responses(404))
def rotate_secret(webhook_endpoint_id: str, project: CurrentProject, session: SessionDep,
                  body: WebhookRotateSecret | None = None) -> WebhookEndpointWithSecret:
    row = project_endpoint(session, project, webhook_endpoint_id)
    keep = body is not None and body.keep_old_secret_active_for_24_hours
    row.previous_secret, row.previous_secret_until = (row.secret, now() + ROTATION_GRACE_S) if keep else (None, None)
    row.secret, row.updated_at = new_secret(), now()
    session.commit()
    return WebhookEndpointWithSecret.from_row(row)


@router.get("/{webhook_endpoint_id}/deliveries", response_model=CursorPage[WebhookDeliveryObject],
            summary="An endpoint's deliveries, newest first, each with its attempts (an extension)", responses=error_responses(404))
def list_deliveries(webhook_endpoint_id: str, project: CurrentProject, session: SessionDep, after: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20) -> CursorPage[WebhookDeliveryObject]:
    endpoint = project_endpoint(session, project, webhook_endpoint_id)
    rows, has_more = fetch_page_after(session, WebhookDelivery, [WebhookDelivery.endpoint_id == endpoint.id], after=after,
                                      limit=limit, newest_first=True)
    attempts: dict[str, list[WebhookAttempt]] = {row.id: [] for row in rows}
    if rows:
        for attempt in session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(attempts)))
                                       .order_by(WebhookAttempt.seq)):
            attempts[attempt.delivery_id].append(attempt)
    return CursorPage[WebhookDeliveryObject].of([WebhookDeliveryObject.from_row(row, attempts[row.id]) for row in rows], has_more)
