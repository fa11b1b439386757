"""Fixtures of the worker tests: a tiny base model under a models directory, settings, a session factory."""

from __future__ import annotations

import pytest

from core.db import make_engine, make_session_factory
from core.settings import Settings
from core.storage import LocalStorage
from tests.conftest import make_tiny_llama
from tests.worker.helpers import MODEL


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    make_tiny_llama(root / MODEL, tokenizer)
    return root


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine):
    return make_session_factory(engine)


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "objects")


@pytest.fixture
def make_settings(tmp_path, database_url, models_dir):
    def make(**overrides) -> Settings:
        values = dict(home=tmp_path / "home", database_url=database_url, broker_url="memory://", storage="local",
                      storage_dir=tmp_path / "objects", models_dir=models_dir, heartbeat_interval_s=0.2)
        return Settings(**{**values, **overrides})

    return make
