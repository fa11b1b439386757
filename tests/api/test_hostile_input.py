"""Input that used to reach the database and come back as a 500: each is a 400 envelope naming the parameter."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, MODEL, assert_error, create_job, upload_ok

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def training_file(client) -> str:
    return upload_ok(client)["id"]


@pytest.mark.parametrize("path", ["/v1/files/file-%00x", "/v1/fine_tuning/jobs/ftjob-%00", "/v1/models/a%00b",
                                  "/v1/fine_tuning/jobs?after=%00", "/v1/files?purpose=fine%00tune"])
def test_a_nul_byte_in_a_path_or_query_is_a_400(client, path):
    assert_error(client.get(path, headers=KEY_A), 400, code="invalid_value")


@pytest.mark.parametrize("body, param", [
    ({"suffix": "a\x00b"}, "suffix"),
    ({"metadata": {"k": "v\x00"}}, "metadata.k"),
    ({"metadata": {"k\x00": "v"}}, "metadata"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"target_modules": ["q_proj\x00"]}}}},
     "method.supervised.hyperparameters.target_modules"),
])
def test_a_nul_byte_in_a_job_body_is_a_400(client, training_file, body, param):
    error = assert_error(create_job(client, training_file, **body), 400, code="invalid_value", param=param)
    assert "NUL" in error["message"]


def test_a_nul_byte_in_the_model_or_file_id_is_a_400(client, training_file):
    response = client.post(JOBS, headers=KEY_A, json={"model": "tiny\x00llama", "training_file": training_file})
    assert_error(response, 400, code="invalid_value", param="model")
    response = client.post(JOBS, headers=KEY_A, json={"model": MODEL, "training_file": "file-\x00"})
    assert_error(response, 400, code="invalid_value", param="training_file")


def test_an_infinite_number_is_a_400(client, training_file):
    body = f'{{"model": "{MODEL}", "training_file": "{training_file}", "hyperparameters": {{"max_grad_norm": 1e999}}}}'
    response = client.post(JOBS, headers={**KEY_A, "Content-Type": "application/json"}, content=body)
    assert_error(response, 400, code="invalid_value", param="hyperparameters.max_grad_norm")
    body = f'{{"model": "{MODEL}", "training_file": "{training_file}", "hyperparameters": {{"max_grad_norm": NaN}}}}'
    response = client.post(JOBS, headers={**KEY_A, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 400


def test_a_model_id_over_255_bytes_is_a_400(client, training_file):
    response = client.post(JOBS, headers=KEY_A, json={"model": "m" * 300, "training_file": training_file})
    assert_error(response, 400, code="invalid_value", param="model")
    assert_error(client.get("/v1/models/" + "m" * 300, headers=KEY_A), 404, code="model_not_found", param="model")


@pytest.mark.parametrize("key", ['a"b', "a\\b", "a.b[0]", "$"])
def test_any_metadata_filter_key_is_answered_without_a_500(client, training_file, key):
    create_job(client, training_file, metadata={key: "v"})
    response = client.get(JOBS, headers=KEY_A, params={f"metadata[{key}]": "v"})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        assert len(response.json()["data"]) == 1


# Found by the schemathesis test (test_schemathesis.py) and the probes around it.


def test_a_metrics_cursor_past_the_step_column_is_a_400(client, training_file):
    job_id = create_job(client, training_file).json()["id"]
    response = client.get(f"{JOBS}/{job_id}/metrics", headers=KEY_A, params={"after": 2**70})
    assert_error(response, 400, code="invalid_value", param="after")
    assert client.get(f"{JOBS}/{job_id}/metrics", headers=KEY_A, params={"after": 2**31 - 1}).status_code == 200


@pytest.mark.parametrize("fragment, param", [
    ('"metadata": {"k": "\\udfff"}', "metadata.k"),
    ('"metadata": {"\\ud800": "v"}', "metadata"),
    ('"hyperparameters": {"target_modules": ["q_proj\\ud800"]}', "hyperparameters.target_modules"),
])
def test_a_lone_surrogate_in_a_job_body_is_a_400_and_no_job(client, training_file, fragment, param):
    """JSON's "\\ud800" escape decodes to a string no UTF-8 encoder takes: it used to be stored (the job queued) and
    the answer then failed to encode, a 500 for a job that exists."""
    body = f'{{"model": "{MODEL}", "training_file": "{training_file}", {fragment}}}'
    response = client.post(JOBS, headers={**KEY_A, "Content-Type": "application/json"}, content=body)
    error = assert_error(response, 400, code="invalid_value", param=param)
    assert "surrogate" in error["message"]
    assert client.get(JOBS, headers=KEY_A).json()["data"] == []


@pytest.fixture
def unreachable_backend_client(tmp_path, database_url, redis_url, queue_name, models_dir):
    settings = make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, inference_url="http://127.0.0.1:9")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}, "messages.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}, "messages.content.text"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]}, "stop"),
    ({"model": "tiny\x00llama", "messages": [{"role": "user", "content": "hi"}]}, "model"),
])
def test_chat_input_that_cannot_be_looked_up_or_sent_on_is_a_400(unreachable_backend_client, body, param):
    """A lone surrogate cannot be encoded for the backend, and a NUL in the model cannot be looked up in PostgreSQL:
    both were 500s. A NUL in the messages is fine (JSON carries it)."""
    content = json.dumps(body).encode()  # ASCII escapes: the surrogates travel as JSON "\\ud800"
    response = unreachable_backend_client.post("/v1/chat/completions", headers={**KEY_A, "Content-Type": "application/json"},
                                               content=content)
    assert_error(response, 400, code="invalid_value", param=param)
    fine = {"model": MODEL, "messages": [{"role": "user", "content": "a\x00b"}]}
    response = unreachable_backend_client.post("/v1/chat/completions", headers=KEY_A, json=fine)
    assert_error(response, 503, code="inference_unavailable", type="server_error")


def test_a_body_that_cannot_be_parsed_at_all_has_a_code(client):
    response = client.post(JOBS, headers={**KEY_A, "Content-Type": "application/json"}, content=b'{"model": "\xff"}')
    assert_error(response, 400, code="invalid_body")
