"""Dependencies the routes take as plain parameters (`Annotated` aliases): settings, one database session per
request, the object storage, the Celery app (to send tasks by name) and the caller's project."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.orm import Session

from api.auth import bearer_scheme, ensure_project, project_for_key
from core.settings import Settings
from core.storage import ObjectStorage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. Routes commit explicitly; anything uncommitted is rolled back at the end,
    and at once when the route raises."""
    session = request.app.state.session_factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_storage(request: Request) -> ObjectStorage:
    return request.app.state.storage


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[ObjectStorage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


def get_current_project(
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> str:
    project = project_for_key(settings, credentials)
    ensure_project(session, project)
    return project


CurrentProject = Annotated[str, Depends(get_current_project)]
