"""Input that used to reach the database and come back as a 500: each is a 400 envelope naming the parameter."""

from __future__ import annotations

import pytest

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
