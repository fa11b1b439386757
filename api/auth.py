"""API keys: `Authorization: Bearer KEY`, each key mapped to a project (`Settings.api_key_map`).

A project's files, jobs and models are invisible to every other project. The caller's `Project` row is created
on its first authenticated request, so that every row that names the project can reference it.
"""

from __future__ import annotations

import hmac

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import APIError
from core.settings import Settings
from core.tables import Project, now

# auto_error=False: a missing header is answered with our envelope, not FastAPI's {"detail": ...}.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key from QLORA_API_KEYS (or $QLORA_HOME/api_key).")


def invalid_api_key(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def project_for_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The project of the presented key; 401 for a missing or unknown key."""
    if credentials is None:
        raise invalid_api_key("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    presented = credentials.credentials.encode()
    project = None
    for key, name in settings.api_key_map().items():
        # compare_digest on every key: the time taken says nothing about which key came close.
        if hmac.compare_digest(key.encode(), presented):
            project = name
    if project is None:
        raise invalid_api_key("Incorrect API key provided.")
    return project


def ensure_project(session: Session, name: str) -> None:
    """Insert the project's row if it is missing (two first requests at once: the loser's insert is dropped)."""
    if session.get(Project, name) is not None:
        return
    session.add(Project(name=name, created_at=now()))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
