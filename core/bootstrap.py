"""Prestart: wait for the database, run the migrations, make sure the bucket and an API key exist.

    python -m core.bootstrap            # what `make run` and docker-compose's one-shot `migrate` service run
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from sqlalchemy import text
from tenacity import Retrying, stop_after_delay, wait_fixed

from core.db import make_engine
from core.settings import Settings, write_once

REPO = Path(__file__).resolve().parents[1]


def wait_for_database(url: str, timeout_s: float = 60.0) -> None:
    """Try `SELECT 1` once a second until it works; after `timeout_s` the last error is raised."""
    engine = make_engine(url)
    try:
        for attempt in Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(1), reraise=True):
            with attempt, engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def migrate(database_url: str) -> None:
    """Build or upgrade the schema by running the Alembic migrations (tests do this too)."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = database_url
    command.upgrade(config, "head")


def ensure_api_key(settings: Settings) -> str | None:
    """With no QLORA_API_KEYS, create a key once under $QLORA_HOME and return it (else None)."""
    if settings.api_keys.strip():
        return None
    return write_once(settings.api_key_file, lambda: "sk-qlora-" + secrets.token_urlsafe(24))


def bootstrap(settings: Settings) -> str | None:
    settings.home.mkdir(parents=True, exist_ok=True)
    assert settings.models_dir is not None
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    wait_for_database(settings.database_url)
    migrate(settings.database_url)
    if settings.storage == "s3":
        from core.storage import S3Storage, make_storage

        storage = make_storage(settings)
        assert isinstance(storage, S3Storage)
        storage.ensure_bucket()
    settings.inference_secret_value()  # the API's and the inference backends' shared secret, before either starts
    return ensure_api_key(settings)


def main() -> int:
    settings = Settings()
    key = bootstrap(settings)
    print(f"database ready: {settings.database_url.split('@')[-1]}")
    if key:
        print(f"api key: {key}  (stored in {settings.api_key_file})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
