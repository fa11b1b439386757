"""The OpenAPI document lists the error responses the API really returns: OpenAI's envelope, never FastAPI's 422."""

from __future__ import annotations

import pytest

from api.main import create_app
from tests.api.conftest import make_settings

ENVELOPE = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    # The document is built from the routes alone: no database, broker or storage is touched.
    tmp = tmp_path_factory.mktemp("openapi")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'unused.db'}", "redis://127.0.0.1:1/0", "unused", tmp / "models")
    return create_app(settings).openapi()


def operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield path, method.upper(), operation


def statuses(spec: dict, path: str, method: str) -> set[str]:
    return set(spec["paths"][path][method.lower()]["responses"])


def test_no_operation_documents_a_422(spec):
    assert [(m, p) for p, m, op in operations(spec) if "422" in op["responses"]] == []
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])


def test_every_v1_operation_documents_the_envelope_errors_every_request_may_get(spec):
    for path, method, operation in operations(spec):
        if not path.startswith("/v1/"):
            continue
        assert {"400", "401", "413", "415"} <= set(operation["responses"]), (method, path)
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                assert response["content"]["application/json"]["schema"] == ENVELOPE, (method, path, status)
                assert response["description"]


def test_each_operation_documents_its_own_errors(spec):
    assert statuses(spec, "/v1/fine_tuning/jobs", "POST") == {"200", "400", "401", "413", "415", "429"}
    assert statuses(spec, "/v1/files", "POST") == {"200", "400", "401", "413", "415", "429"}
    assert statuses(spec, "/v1/fine_tuning/jobs/{job_id}/export", "POST") == {"200", "400", "401", "404", "409", "413", "415", "429"}
    assert statuses(spec, "/v1/models/{model_id}", "DELETE") == {"200", "400", "401", "403", "404", "413", "415"}
    assert statuses(spec, "/v1/chat/completions", "POST") == {"200", "400", "401", "404", "413", "415", "429", "500", "503"}
    for path in ("/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/fine_tuning/jobs/{job_id}",
                 "/v1/fine_tuning/jobs/{job_id}/cancel", "/v1/fine_tuning/jobs/{job_id}/events",
                 "/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/content", "/v1/models/{model_id}"):
        for method in spec["paths"][path]:
            assert "404" in statuses(spec, path, method), (method, path)
    # Lists of the caller's own objects have nothing to be missing.
    assert "404" not in statuses(spec, "/v1/fine_tuning/jobs", "GET")
    assert "404" not in statuses(spec, "/v1/models", "GET")


def test_the_envelope_schema(spec):
    schemas = spec["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert set(schemas["ErrorObject"]["required"]) == {"message", "type", "param", "code"}


def test_an_upload_documents_the_one_purpose_it_accepts(spec):
    form = spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert spec["components"]["schemas"][form]["properties"]["purpose"]["enum"] == ["fine-tune"]
