"""Settings (defaults, QLORA_* overrides, API keys), the prestart bootstrap, and the Alembic migrations."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from sqlalchemy import inspect

from core.bootstrap import REPO, bootstrap, ensure_api_key
from core.db import make_engine
from core.settings import Settings
from core.tables import Base

OPERATIONS_DOC = REPO / "docs" / "operations.md"


# --- Settings -------------------------------------------------------------------------------------------------


def test_defaults_are_the_embedded_mode(no_qlora_env, tmp_path):
    no_qlora_env.chdir(tmp_path)
    settings = Settings()
    home = tmp_path.resolve() / ".qlora"
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home / 'qlora.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{home / 'broker.db'}"
    assert settings.storage == "local"
    assert settings.storage_dir == home / "objects"
    assert settings.models_dir == home / "models"
    assert settings.api_key_file == home / "api_key"
    assert settings.s3_bucket is None and settings.s3_endpoint is None
    assert (settings.task_queue, settings.max_attempts) == ("qlora", 3)
    assert settings.heartbeat_interval_s < settings.heartbeat_timeout_s, "a live job must beat several times per timeout"


def test_environment_overrides(no_qlora_env, tmp_path):
    env = {
        "QLORA_HOME": str(tmp_path / "home"),
        "QLORA_DATABASE_URL": "postgresql+psycopg://qlora:pw@postgres:5432/qlora",
        "QLORA_BROKER_URL": "redis://redis:6379/0",
        "QLORA_S3_BUCKET": "qlora",
        "QLORA_S3_ENDPOINT": "http://minio:9000",
        "QLORA_MODELS_DIR": "/data/models",
        "QLORA_MAX_UPLOAD_BYTES": "1000",
        "QLORA_HEARTBEAT_TIMEOUT_S": "60.5",
        "QLORA_MAX_ATTEMPTS": "5",
        "QLORA_TASK_QUEUE": "gpu-a100",
    }
    for name, value in env.items():
        no_qlora_env.setenv(name, value)
    settings = Settings()
    assert settings.home == (tmp_path / "home").resolve()
    assert settings.database_url == env["QLORA_DATABASE_URL"]
    assert settings.broker_url == env["QLORA_BROKER_URL"]
    assert settings.storage == "s3", "a bucket selects the S3 backend"
    assert (settings.s3_bucket, settings.s3_endpoint) == ("qlora", "http://minio:9000")
    assert settings.models_dir == Path("/data/models")
    assert settings.max_upload_bytes == 1000 and settings.heartbeat_timeout_s == 60.5
    assert settings.max_attempts == 5 and settings.task_queue == "gpu-a100"
    assert settings.storage_dir == settings.home / "objects"


def test_an_explicit_storage_wins_over_the_bucket(no_qlora_env, tmp_path):
    no_qlora_env.setenv("QLORA_STORAGE", "local")
    no_qlora_env.setenv("QLORA_S3_BUCKET", "qlora")
    assert Settings(home=tmp_path).storage == "local"


@pytest.mark.parametrize("name, value", [("QLORA_MAX_ATTEMPTS", "0"), ("QLORA_STORAGE", "gcs"), ("QLORA_HEARTBEAT_INTERVAL_S", "-1")])
def test_invalid_values_are_refused_at_start(no_qlora_env, tmp_path, name, value):
    from pydantic import ValidationError

    no_qlora_env.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings(home=tmp_path)


def test_api_key_map_parsing(no_qlora_env, tmp_path):
    no_qlora_env.setenv("QLORA_API_KEYS", " k1, k2=team ,,k3 = other ")
    assert Settings(home=tmp_path).api_key_map() == {"k1": "default", "k2": "team", "k3": "other"}


def test_api_key_map_falls_back_to_the_key_file(no_qlora_env, tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.api_key_map() == {}
    settings.api_key_file.write_text("sk-qlora-generated\n")
    assert settings.api_key_map() == {"sk-qlora-generated": "default"}
    # QLORA_API_KEYS, when set, replaces the file.
    assert Settings(home=tmp_path, api_keys="k1").api_key_map() == {"k1": "default"}


def test_every_setting_has_a_description_and_is_in_the_operations_doc():
    text = OPERATIONS_DOC.read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"
        assert f"QLORA_{name.upper()}" in text, f"docs/operations.md does not mention QLORA_{name.upper()}"
    documented = set(re.findall(r"\bQLORA_([A-Z0-9_]+)\b", text))
    unknown = {f"QLORA_{n}" for n in documented} - {f"QLORA_{n.upper()}" for n in Settings.model_fields}
    assert not unknown, f"docs/operations.md names variables that Settings does not read: {sorted(unknown)}"


# --- bootstrap ------------------------------------------------------------------------------------------------


def test_bootstrap_on_a_fresh_home(no_qlora_env, tmp_path):
    settings = Settings(home=tmp_path / "home")
    key = bootstrap(settings)
    assert key and key.startswith("sk-qlora-")
    key_file = settings.api_key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert settings.api_key_map() == {key: "default"}
    assert settings.models_dir.is_dir()
    assert set(inspect(make_engine(settings.database_url)).get_table_names()) >= set(Base.metadata.tables)

    written = key_file.stat().st_mtime_ns
    assert bootstrap(settings) == key, "a second run keeps the key"
    assert key_file.stat().st_mtime_ns == written


def test_bootstrap_with_configured_keys_writes_no_key_file(no_qlora_env, tmp_path):
    settings = Settings(home=tmp_path, api_keys="k1=team")
    assert bootstrap(settings) is None
    assert not settings.api_key_file.exists()


def test_bootstrap_creates_the_bucket(no_qlora_env, tmp_path, s3_endpoint, aws_test_credentials):
    import secrets

    from core.storage import S3Storage, make_storage

    settings = Settings(home=tmp_path, s3_bucket=f"qlora-boot-{secrets.token_hex(4)}", s3_endpoint=s3_endpoint, api_keys="k")
    bootstrap(settings)
    storage = make_storage(settings)
    assert isinstance(storage, S3Storage)
    storage.client.head_bucket(Bucket=settings.s3_bucket)


def test_the_key_file_is_created_private(no_qlora_env, tmp_path):
    """The file holding the key is private from the moment it exists: with chmod out of the way, only the mode
    it was created with is left to see."""
    no_qlora_env.setattr(Path, "chmod", lambda self, mode: None)  # only the mode the file is created with counts
    old = os.umask(0o022)
    try:
        ensure_api_key(Settings(home=tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(Settings(home=tmp_path).api_key_file.stat().st_mode) == 0o600


# --- migrations -----------------------------------------------------------------------------------------------


def alembic_config(url: str):
    from alembic.config import Config

    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = url
    return config


def schema_differences(url: str) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_create_exactly_the_model_tables(postgres_url):
    assert table_names(postgres_url) == set(Base.metadata.tables) | {"alembic_version"}


def test_migrated_schema_matches_the_models(database_url):
    """What `alembic check` does: autogenerate against the migrated database finds nothing to do."""
    assert schema_differences(database_url) == []


def test_downgrade_to_base_and_upgrade_again(postgres_url):
    from alembic import command

    config = alembic_config(postgres_url)
    command.downgrade(config, "base")
    assert table_names(postgres_url) == {"alembic_version"}
    command.upgrade(config, "head")
    assert table_names(postgres_url) == set(Base.metadata.tables) | {"alembic_version"}
    assert schema_differences(postgres_url) == []


def test_one_head_and_revisions_named_by_date():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    for revision in script.walk_revisions():
        assert re.match(r"\d{4}_\d{2}_\d{2}_", Path(revision.path).name), revision.path


def test_the_job_totals_migration_takes_them_from_the_events(postgres_url):
    """Jobs made before the row held total_steps and memory_estimate get them from the events that carried them.
    (PostgreSQL: SQLite's downgrade rebuilds the jobs table, and the rebuild's cascade deletes the events.)"""
    from alembic import command

    from core.db import make_session_factory, session_scope
    from core.jobs import add_event
    from tests.worker.helpers import create_job, get_job

    config = alembic_config(postgres_url)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    old, bare = (create_job(factory, training_file=name, status="cancelled") for name in ("file-a", "file-b"))
    with session_scope(factory) as session:
        add_event(session, old, "info", "Estimated peak GPU memory: 1.00 GiB (gradient checkpointing on)", data={"total": 1 << 30})
        for step in (1, 2):
            add_event(session, old, "info", f"Step {step}/7: training loss=1.0000", type="metrics", data={"step": step, "total_steps": 7})
    command.downgrade(config, "0006")  # the columns go ...
    command.upgrade(config, "head")  # ... and come back filled from the events
    assert (get_job(factory, old).total_steps, get_job(factory, old).memory_estimate) == (7, {"total": 1 << 30})
    assert (get_job(factory, bare).total_steps, get_job(factory, bare).memory_estimate) == (None, None)
    engine.dispose()


def test_jobs_before_the_method_option_become_supervised_jobs(tmp_path):
    """A job stored before `method` was an option gets method 'supervised' in its config, and loses it on downgrade."""
    import json

    import sqlalchemy as sa
    from alembic import command

    from contract.options import TrainingConfig

    url = f"sqlite:///{tmp_path / 'qlora.db'}"
    config = alembic_config(url)
    command.upgrade(config, "0006")
    old_config = {k: v for k, v in TrainingConfig().resolved().items() if k != "method"}
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO projects (name, created_at) VALUES ('p', 0)"))
            conn.execute(sa.text(
                "INSERT INTO jobs (id, project, model, training_file, hyperparameters, training_config, status, result_files, "
                "created_at, attempt) VALUES ('ftjob-old', 'p', 'm', 'file-x', '{}', :config, 'succeeded', '[]', 0, 0)"),
                {"config": json.dumps(old_config)})

        def stored() -> dict:
            with engine.connect() as conn:
                return json.loads(conn.execute(sa.text("SELECT training_config FROM jobs")).scalar_one())

        command.upgrade(config, "head")
        assert stored() == {**old_config, "method": "supervised"}
        assert TrainingConfig.from_dict(stored()).method == "supervised"
        command.downgrade(config, "0012")  # below 0013, whatever migrations follow it
        assert stored() == old_config
    finally:
        engine.dispose()


def test_files_before_the_kind_column_are_supervised_when_processed(tmp_path):
    """Files uploaded before files.kind could not hold pairs (they failed validation): processed ones become
    'supervised', failed ones have no kind."""
    import sqlalchemy as sa
    from alembic import command

    url = f"sqlite:///{tmp_path / 'qlora.db'}"
    config = alembic_config(url)
    command.upgrade(config, "0013")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO projects (name, created_at) VALUES ('p', 0)"))
            for file_id, status in (("file-ok", "processed"), ("file-bad", "error")):
                conn.execute(sa.text(
                    "INSERT INTO files (id, project, filename, purpose, bytes, sha256, status, storage_key, created_at) "
                    "VALUES (:id, 'p', 'f.jsonl', 'fine-tune', 1, 'x', :status, 'files/x', 0)"), {"id": file_id, "status": status})
        command.upgrade(config, "head")
        with engine.connect() as conn:
            kinds = dict(conn.execute(sa.text("SELECT id, kind FROM files")).all())
        assert kinds == {"file-ok": "supervised", "file-bad": None}
        command.downgrade(config, "0013")
    finally:
        engine.dispose()
