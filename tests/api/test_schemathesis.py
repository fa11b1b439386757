"""Property-based checks of every operation in /openapi.json (schemathesis): generated requests, valid and invalid,
with a valid API key, must never get a 5xx, and every answer must be documented: its status code, its content type,
its headers and its body's schema. Invalid requests must be refused (a 4xx).

Run against the deployed mode: PostgreSQL, Redis as the broker, and the real embedded inference server (on a tiny
random Llama) behind chat completions; and on SQLite (the embedded mode's database). The path ids are generated
strings (404s) half the time and, the other half, the ids of real objects (a file, a succeeded job with its adapter,
a checkpoint, a metric and an export), so that the 200 answers are checked too: chats with the base, the
fine-tuned model and the checkpoint model, exports of the job. Bounded so that it takes seconds per operation: a
few examples per operation and mode.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
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
from sqlalchemy import update

from api.main import create_app
from core import ids
from core.model_names import checkpoint_model_name, fine_tuned_model_name
from core.tables import Checkpoint, Export, File, Job, JobMetric, now
from inference.server import create_app as create_inference_app
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, MODEL, create_job_ok, db, upload_ok
from tests.inference.conftest import serving, store_adapter

# A deeper search, e.g. before a release: SCHEMATHESIS_EXAMPLES=200.
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "8"))
CONFORMANCE = [status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance]
CHECKS = {GenerationMode.POSITIVE: [not_a_server_error, *CONFORMANCE],
          GenerationMode.NEGATIVE: [not_a_server_error, *CONFORMANCE, negative_data_rejection]}
CHAT = ("POST", "/v1/chat/completions")
# A multipart form has no null: FastAPI reads an empty field as one not sent, so an empty `expires_after[seconds]`
# (schemathesis's invalid "string instead of integer or null") is the documented null and accepted, and a file part
# whose bytes are `null` (schemathesis's "null instead of a file") is a 4-byte file. The other checks still hold
# every invalid upload.
FORM_EMPTY_IS_NULL = {("POST", "/v1/files"), ("POST", "/v1/uploads/{upload_id}/parts")}


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


# The served base's context: a chat's max_tokens must fit it (else a 400), so no generated request makes the CPU
# generate for long.
CONTEXT = 96


@pytest.fixture
def models_dir(tmp_path, tiny_model_dir):
    """The tiny random Llama (real weights: the inference server loads them) with a short context."""
    model = tmp_path / "models" / MODEL
    model.mkdir(parents=True)
    for item in tiny_model_dir.iterdir():
        (model / item.name).symlink_to(item)
    (model / "config.json").unlink()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return model.parent


@pytest.fixture
def client(tmp_path, settings):
    """The API with the real embedded inference server behind chat completions (a few tokens per answer)."""
    backend = create_inference_app(settings.model_copy(update={"inference_max_new_tokens": 4}))
    with serving(backend) as url, TestClient(create_app(settings.model_copy(update={"inference_url": url}))) as test_client:
        yield test_client


@pytest.fixture
def api_schema(client):
    yield schemathesis.openapi.from_asgi("/openapi.json", client.app)
    shutdown_lifespans()  # schemathesis runs the app's lifespan itself and would keep it to the end of the session


def real_objects(client, tiny_model_dir, work: Path) -> dict[str, Any]:
    """A file, a succeeded job with its adapter and a checkpoint (real adapters for the inference server), a metrics
    row, an export, an upload, a checkpoint permission and a webhook endpoint: the path parameters of requests that find something, and the models chats name."""
    file_id = upload_ok(client)["id"]
    job = create_job_ok(client, file_id, suffix="st", metadata={"team": "search"})
    storage = client.app.state.storage
    work.mkdir(parents=True, exist_ok=True)
    checkpoint_id, export_id, result_id = ids.checkpoint_id(), ids.export_id(), ids.file_id()
    key = f"checkpoints/{job['id']}/step-2.tar.gz"
    store_adapter(tiny_model_dir, storage, key, work, seed=2)
    store_adapter(tiny_model_dir, storage, f"files/{result_id}", work, seed=1)
    model = fine_tuned_model_name(MODEL, job["organization_id"], "st", job["id"])
    with db(client) as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(status="succeeded", fine_tuned_model=model, result_files=[result_id],
                                                                     finished_at=now()))
        session.add(File(id=result_id, project=job["organization_id"], filename=f"{job['id']}-adapter.tar.gz", purpose="fine-tune-results",
                         bytes=1, sha256="0" * 64, status="processed", storage_key=f"files/{result_id}", created_at=now()))
        session.add(Checkpoint(id=checkpoint_id, job_id=job["id"], step=2, storage_key=key, metrics={"train_loss": 1.5},
                               fine_tuned_model_checkpoint=checkpoint_model_name(model, 2)))
        session.add(JobMetric(job_id=job["id"], step=2, values={"train_loss": 1.5}))
        session.add(Export(id=export_id, job_id=job["id"], status="queued", created_at=now()))
    checkpoint_model = checkpoint_model_name(model, 2)
    upload = client.post("/v1/uploads", headers=KEY_A, json={"filename": "train.jsonl", "purpose": "fine-tune", "bytes": 100,
                                                             "mime_type": "text/jsonl"})
    permission = client.post(f"/v1/fine_tuning/checkpoints/{checkpoint_model}/permissions", headers=KEY_A,
                             json={"project_ids": ["proj-b"]})
    webhook = client.post("/v1/webhook_endpoints", headers=KEY_A, json={"url": "http://93.184.216.34/hook",
                                                                        "event_types": ["fine_tuning.job.succeeded"]})
    assert upload.status_code == 200 and permission.status_code == 200 and webhook.status_code == 200, (upload.text, permission.text, webhook.text)
    return {"webhook_endpoint_id": webhook.json()["id"], "file_id": file_id, "job_id": job["id"], "checkpoint_id": checkpoint_id, "export_id": export_id, "model_id": MODEL,
            "upload_id": upload.json()["id"], "fine_tuned_model_checkpoint": checkpoint_model,
            "permission_id": permission.json()["data"][0]["id"], "models": [MODEL, model, checkpoint_model]}


def naming_real_objects(case, real: dict[str, Any], model: str):
    """A valid body whose model and files exist, so that the rest of it (the hyperparameters, the chat's options)
    is what is tried."""
    if isinstance(case.body, dict) and "model" in case.body:
        body = {**case.body, "model": model}
        for name in ("training_file", "validation_file"):
            if name in body:
                body[name] = real["file_id"]
        case.body = body
    return case


def run_operation(operation, mode: GenerationMode, real: dict[str, str]) -> None:
    """Hypothesis draws requests for one operation in one mode; each is sent and its answer checked."""
    checks = CHECKS[mode]
    if (operation.method.upper(), operation.path) in FORM_EMPTY_IS_NULL:
        checks = [check for check in checks if check is not negative_data_rejection]
    in_path = {p.name for p in operation.path_parameters}
    strategy = operation.as_strategy(mode, headers=dict(KEY_A))
    if in_path:
        strategy = st.one_of(strategy, operation.as_strategy(
            mode, headers=dict(KEY_A), path_parameters={name: real[name] for name in in_path}))
    if mode is GenerationMode.POSITIVE and operation.body:
        models = real["models"] if (operation.method.upper(), operation.path) == CHAT else [MODEL]
        strategy = st.one_of(strategy, st.tuples(strategy, st.sampled_from(models)).map(lambda pair: naming_real_objects(pair[0], real, pair[1])))

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(checks=checks)

    check()


@pytest.mark.timeout(900)
def test_every_operation_answers_as_documented(client, api_schema, tiny_model_dir, tmp_path):
    real = real_objects(client, tiny_model_dir, tmp_path / "adapters")
    failures = []
    for method, path, mode in CASES:
        try:
            run_operation(api_schema[path][method], mode, real)
        except (Exception, BaseExceptionGroup) as exc:  # every operation is tried; the failures are reported together
            failures.append(f"{method} {path} ({mode}):\n{exc}")
    assert not failures, "\n\n".join(failures)
    # The 200 answers were among those checked: chats the inference server answered, an export of the real job.
    registry = client.app.state.metrics.registry
    for route in ("/v1/chat/completions", "/v1/fine_tuning/jobs/{job_id}/export"):
        answered = registry.get_sample_value("qlora_api_requests_total", {"method": "POST", "route": route, "status": "200"})
        assert answered, f"no POST {route} was answered 200"
