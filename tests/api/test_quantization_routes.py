"""The quantization routes through the API: /v1/models says how a base directory is stored (read from its config.json),
and quantization='eetq' is a 400 with the envelope and the reason."""

from __future__ import annotations

import json

import openai
import pytest

from tests.api.helpers import KEY_A, MODEL, TINY_LLAMA_CONFIG, assert_error, create_job, upload_ok


@pytest.fixture
def database_url(sqlite_url):
    """SQLite only: nothing here depends on the database (the model list and the options check read no rows)."""
    return sqlite_url


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}


def test_models_say_how_a_base_is_stored(client, models_dir):
    for name, quantization_config in (("tiny-gptq", GPTQ), ("tiny-awq", {"quant_method": "awq", "bits": 4, "group_size": 64})):
        (models_dir / name).mkdir()
        (models_dir / name / "config.json").write_text(json.dumps({**TINY_LLAMA_CONFIG, "quantization_config": quantization_config}))

    by_id = {m["id"]: m for m in client.get("/v1/models", headers=KEY_A).json()["data"]}
    assert by_id["tiny-gptq"]["quantization"] == {"method": "gptq", "bits": 4, "group_size": 128}
    assert by_id["tiny-awq"]["quantization"] == {"method": "awq", "bits": 4, "group_size": 64}
    assert by_id[MODEL]["quantization"] is None  # a plain base: jobs quantize it on load
    assert client.get("/v1/models/tiny-gptq", headers=KEY_A).json() == by_id["tiny-gptq"]

    # The openai SDK, validating strictly, takes the extension field as an extra.
    sdk = openai.OpenAI(api_key="key-a", base_url="http://testserver/v1", http_client=client, max_retries=0,
                        _strict_response_validation=True)
    model = sdk.models.retrieve("tiny-gptq")
    assert model.owned_by == "system" and model.model_extra["quantization"]["method"] == "gptq"
    assert {m.id for m in sdk.models.list()} == {MODEL, "tiny-gptq", "tiny-awq"}


def test_eetq_is_a_400_that_says_why(client):
    file_id = upload_ok(client)["id"]
    response = create_job(client, file_id, model=MODEL,
                          method={"type": "supervised", "supervised": {"hyperparameters": {"quantization": "eetq"}}})
    error = assert_error(response, 400, code="unsupported_value", param="method.supervised.hyperparameters.quantization")
    assert "model hub" in error["message"] and "'8bit'" in error["message"]
