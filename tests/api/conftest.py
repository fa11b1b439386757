"""API fixtures: an app on a fresh migrated database (PostgreSQL and SQLite, via `database_url`), a fake base
model directory, local object storage under tmp_path, and Redis as the Celery broker with a queue of its own."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from tests.api.helpers import API_KEYS, MAX_UPLOAD, MODEL, TINY_LLAMA_CONFIG


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    model = tmp_path / "models" / MODEL
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    return model.parent


@pytest.fixture
def queue_name(redis_url: str):
    """A queue of this test's own, removed afterwards with the binding sets kombu keeps for it."""
    import redis

    name = f"qlora-api-test-{secrets.token_hex(6)}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}", f"{name}-control", f"_kombu.binding.{name}-control")


def make_settings(tmp_path: Path, database_url: str, broker_url: str, task_queue: str, models_dir: Path, **overrides) -> Settings:
    values = dict(
        home=tmp_path / "home",
        database_url=database_url,
        broker_url=broker_url,
        task_queue=task_queue,
        api_keys=API_KEYS,
        max_upload_bytes=MAX_UPLOAD,
        models_dir=models_dir,
        storage="local",
    )
    return Settings(**(values | overrides))


@pytest.fixture
def settings(tmp_path, database_url, redis_url, queue_name, models_dir) -> Settings:
    return make_settings(tmp_path, database_url, redis_url, queue_name, models_dir)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client
