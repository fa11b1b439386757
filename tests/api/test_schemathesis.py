"""Property-based checks of every operation in /openapi.json (schemathesis): generated requests, valid and invalid,
with a valid API key, must never get a 5xx, and every answer must be documented: its status code, its content type,
its headers and its body's schema. Invalid requests must be refused (a 4xx).

The path ids are generated strings (404s) half the time and, the other half, the ids of real objects (a file, a job
with a checkpoint, a metric and an export), so that the 200 answers are checked too. Bounded so that it takes
seconds: a few examples per operation and mode, one app on SQLite (the PostgreSQL-specific 500s have tests of their
own in test_hostile_input.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import create_app
from core import ids
from core.model_names import checkpoint_model_name, fine_tuned_model_name
from core.models import Checkpoint, Export, JobMetric, now
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, MODEL, create_job_ok, db, upload_ok

# A deeper search, e.g. before a release: SCHEMATHESIS_EXAMPLES=200.
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "8"))
CONFORMANCE = [status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance]
CHECKS = {GenerationMode.POSITIVE: [not_a_server_error, *CONFORMANCE],
          GenerationMode.NEGATIVE: [not_a_server_error, *CONFORMANCE, negative_data_rejection]}
# Chat completions need an inference backend, and none is configured here: the route answers the documented
# 503 `inference_unavailable` by design once the model is found (backend_unavailable_only checks that).
NEEDS_BACKEND = {("POST", "/v1/chat/completions")}
# A multipart form has no null: FastAPI reads an empty field as one not sent, so an empty `expires_after[seconds]`
# (schemathesis's invalid "string instead of integer or null") is the documented null and accepted. The other
# checks still hold every invalid upload.
FORM_EMPTY_IS_NULL = {("POST", "/v1/files")}


def _cases() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) for every operation, read from the document (no database needed); DELETEs last, so
    that the real objects are there for the other operations. Invalid requests only where one can be made: an
    operation whose only parameters are free strings in the path has none."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = make_settings(root, f"sqlite:///{root / 'unused.db'}", "redis://127.0.0.1:1/0", "unused", root / "models")
        spec = create_app(settings).openapi()
    cases = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            cases.append((method.upper(), path, GenerationMode.POSITIVE))
            if "requestBody" in operation or any(p["in"] == "query" for p in operation.get("parameters", [])):
                cases.append((method.upper(), path, GenerationMode.NEGATIVE))
    return sorted(cases, key=lambda case: case[0] == "DELETE")


CASES = _cases()


@pytest.fixture
def database_url(sqlite_url):
    return sqlite_url


@pytest.fixture
def api_schema(client):
    yield schemathesis.openapi.from_asgi("/openapi.json", client.app)
    shutdown_lifespans()  # schemathesis runs the app's lifespan itself and would keep it to the end of the session


def real_objects(client) -> dict[str, str]:
    """A file, a job with a checkpoint (and its archive), a metrics row and an export: the path parameters of
    requests that find something."""
    file_id = upload_ok(client)["id"]
    job = create_job_ok(client, file_id, suffix="st", metadata={"team": "search"})
    archive = client.app.state.settings.home / "ckpt.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really an archive")
    key = f"checkpoints/{job['id']}/step-2.tar.gz"
    client.app.state.storage.put_file(key, archive)
    checkpoint_id, export_id = ids.checkpoint_id(), ids.export_id()
    model = fine_tuned_model_name(MODEL, job["organization_id"], "st", job["id"])
    with db(client) as session:
        session.add(Checkpoint(id=checkpoint_id, job_id=job["id"], step=2, storage_key=key, metrics={"train_loss": 1.5},
                               fine_tuned_model_checkpoint=checkpoint_model_name(model, 2)))
        session.add(JobMetric(job_id=job["id"], step=2, values={"train_loss": 1.5}))
        session.add(Export(id=export_id, job_id=job["id"], status="queued", created_at=now()))
    return {"file_id": file_id, "job_id": job["id"], "checkpoint_id": checkpoint_id, "export_id": export_id, "model_id": MODEL}


def naming_real_objects(case, real: dict[str, str]):
    """A valid body whose model and files exist, so that the rest of it (the hyperparameters) is what is tried."""
    if isinstance(case.body, dict) and "model" in case.body:
        body = {**case.body, "model": MODEL}
        for name in ("training_file", "validation_file"):
            if name in body:
                body[name] = real["file_id"]
        case.body = body
    return case


def backend_unavailable_only(ctx, response, case) -> None:
    """A 5xx from chat completions is the documented 503 of a missing backend, nothing else."""
    if response.status_code >= 500:
        assert response.status_code == 503 and response.json()["error"]["code"] == "inference_unavailable", response.text


def run_operation(operation, mode: GenerationMode, real: dict[str, str]) -> None:
    """Hypothesis draws requests for one operation in one mode; each is sent and its answer checked."""
    checks = CHECKS[mode]
    if (operation.method.upper(), operation.path) in NEEDS_BACKEND:
        checks = [check for check in checks if check is not not_a_server_error] + [backend_unavailable_only]
    if (operation.method.upper(), operation.path) in FORM_EMPTY_IS_NULL:
        checks = [check for check in checks if check is not negative_data_rejection]
    in_path = {p.name for p in operation.path_parameters}
    strategy = operation.as_strategy(mode, headers=dict(KEY_A))
    if in_path:
        strategy = st.one_of(strategy, operation.as_strategy(
            mode, headers=dict(KEY_A), path_parameters={name: real[name] for name in in_path}))
    if mode is GenerationMode.POSITIVE and operation.body:
        strategy = st.one_of(strategy, strategy.map(lambda case: naming_real_objects(case, real)))

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(checks=checks)

    check()


def test_every_operation_answers_as_documented(client, api_schema):
    real = real_objects(client)
    failures = []
    for method, path, mode in CASES:
        try:
            run_operation(api_schema[path][method], mode, real)
        except (Exception, BaseExceptionGroup) as exc:  # every operation is tried; the failures are reported together
            failures.append(f"{method} {path} ({mode}):\n{exc}")
    assert not failures, "\n\n".join(failures)
