"""Fixtures for the core tests: an engine and session factory on a database built by the migrations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_session_factory


@pytest.fixture
def session_factory(database_url) -> Iterator[sessionmaker[Session]]:
    """Sessions on PostgreSQL and on SQLite (a fresh database each, built by the migrations)."""
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def pg_session_factory(postgres_url) -> Iterator[sessionmaker[Session]]:
    """Sessions on PostgreSQL only: for the tests where two connections race for one row."""
    engine = make_engine(postgres_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def no_qlora_env(monkeypatch) -> pytest.MonkeyPatch:
    """No QLORA_* variable from the caller's environment leaks into a Settings() built by the test."""
    import os

    for name in list(os.environ):
        if name.startswith("QLORA_"):
            monkeypatch.delenv(name)
    return monkeypatch
