"""Jobs on a pre-quantized base (config.json with a GPTQ quantization_config): the job's quantization is the base's,
and on-the-fly quantization options given for it are a 400 naming the option (contract.prequantized)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from core.tables import Job
from tests.api.helpers import KEY_A, MODEL, TINY_LLAMA_CONFIG, assert_error, create_job, db, upload_ok

GPTQ_MODEL = "tiny-llama-gptq"


@pytest.fixture
def database_url(sqlite_url):
    return sqlite_url  # the decision is the same on both databases: one is enough


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    quantized = {**TINY_LLAMA_CONFIG, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}
    for name, config in ((MODEL, TINY_LLAMA_CONFIG), (GPTQ_MODEL, quantized),
                         ("tiny-llama-fp8", {**TINY_LLAMA_CONFIG, "quantization_config": {"quant_method": "fp8"}})):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def test_a_job_on_a_gptq_base_trains_it_as_gptq(client):
    training_file = upload_ok(client)["id"]
    response = create_job(client, training_file, model=GPTQ_MODEL, hyperparameters={"lora_r": 8})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["hyperparameters"]["quantization"] == "gptq"
    with db(client) as session:
        row = session.scalar(select(Job).where(Job.id == job["id"]))
        assert row.training_config["quantization"] == "gptq" and row.hyperparameters == {"lora_r": 8}
    # The memory estimate counts the weights as the base stores them (contract.memory reads its quantization_config).
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=KEY_A).json()["data"]
    assert any(e["message"].startswith("Estimated peak GPU memory") for e in events), events
    # naming the base's own method is allowed
    same = create_job(client, training_file, model=GPTQ_MODEL, hyperparameters={"quantization": "gptq"})
    assert same.status_code == 200, same.text


@pytest.mark.parametrize(("given", "param", "words"), [
    ({"quantization": "4bit"}, "quantization", "pre-quantized with GPTQ"),
    ({"quantization": "awq"}, "quantization", "pre-quantized with GPTQ"),
    ({"quant_type": "nf4"}, "quant_type", "leave 'quant_type' out"),
    ({"double_quant": False}, "double_quant", "leave 'double_quant' out"),
    ({"compute_dtype": "fp32"}, "compute_dtype", "16 bits"),
])
def test_on_the_fly_options_on_a_gptq_base_are_refused(client, given, param, words):
    training_file = upload_ok(client)["id"]
    error = assert_error(create_job(client, training_file, model=GPTQ_MODEL, method={"type": "supervised", "supervised": {"hyperparameters": given}}),
                         400, code="invalid_hyperparameter", param=f"method.supervised.hyperparameters.{param}")
    assert words in error["message"]


def test_gptq_on_a_float_base_says_how_to_make_a_copy(client):
    training_file = upload_ok(client)["id"]
    error = assert_error(create_job(client, training_file, hyperparameters={"quantization": "gptq"}, headers=KEY_A),
                         400, code="invalid_hyperparameter", param="hyperparameters.quantization")
    assert "qlora-quantize --method gptq" in error["message"]


def test_a_base_quantized_another_way_is_refused(client):
    training_file = upload_ok(client)["id"]
    error = assert_error(create_job(client, training_file, model="tiny-llama-fp8"), 400, code="invalid_value", param="model")
    assert "'fp8'" in error["message"]
