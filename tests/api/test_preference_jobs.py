"""Preference files and jobs: the upload records a file's kind; a job whose method does not match is a 400 naming
the file."""

from __future__ import annotations

import json

import pytest

from core.tables import File
from tests.api.helpers import assert_error, create_job, db, upload_ok


def pairs_jsonl(n: int = 12) -> bytes:
    lines = [{"input": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
              "preferred_output": [{"role": "assistant", "content": str(2 * i)}],
              "non_preferred_output": [{"role": "assistant", "content": "I cannot count."}]} for i in range(n)]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_the_upload_records_the_file_kind(client):
    pairs = upload_ok(client, pairs_jsonl())
    examples = upload_ok(client)
    broken = upload_ok(client, b'{"input": {"messages": []}}\n')
    assert pairs["status"] == examples["status"] == "processed" and broken["status"] == "error"
    assert "missing 'non_preferred_output'" in broken["status_details"]
    with db(client) as session:
        kinds = {row.id: row.kind for row in session.query(File)}
    assert (kinds[pairs["id"]], kinds[examples["id"]], kinds[broken["id"]]) == ("preference", "supervised", None)


def test_a_supervised_job_on_pairs_is_a_400_on_the_file(client):
    pairs = upload_ok(client, pairs_jsonl())["id"]
    examples = upload_ok(client)["id"]
    error = assert_error(create_job(client, pairs), 400, code="invalid_file_format", param="training_file")
    assert "preference pairs" in error["message"]
    assert_error(create_job(client, examples, validation_file=pairs), 400, code="invalid_file_format", param="validation_file")
    with db(client) as session:  # legacy rows (kind NULL) hold examples
        session.get(File, session.query(File.seq).filter(File.id == examples).scalar()).kind = None
    assert create_job(client, examples).status_code == 200


def test_sdk_creates_a_dpo_job_and_gets_its_method_back(client):
    import openai

    from tests.api.helpers import MODEL

    sdk = openai.OpenAI(api_key="key-a", base_url="http://testserver/v1", http_client=client, max_retries=0,
                        _strict_response_validation=True)
    pairs = sdk.files.create(file=("pairs.jsonl", pairs_jsonl()), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=pairs.id,
                                      method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    assert job.method.supervised is None
    assert sdk.fine_tuning.jobs.retrieve(job.id).method.dpo.hyperparameters.beta == 0.1
    auto = sdk.fine_tuning.jobs.create(model=MODEL, training_file=pairs.id,
                                       method={"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto", "n_epochs": 1}}})
    assert auto.method.dpo.hyperparameters.beta == 0.1 and auto.method.dpo.hyperparameters.n_epochs == 1
    for beta in (3, 0, -1, "high"):
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.fine_tuning.jobs.create(model=MODEL, training_file=pairs.id, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": beta}}})
        assert bad.value.param == "method.dpo.hyperparameters.beta", beta


@pytest.mark.parametrize("hyperparameters, param", [
    ({"loss_type": "kto"}, "loss_type"),
    ({"loss_type": "sigmoid", "simpo_gamma": 1.0}, "simpo_gamma"),
    ({"loss_type": "simpo", "simpo_gamma": -1}, "simpo_gamma"),
    ({"rpo_alpha": -0.5}, "rpo_alpha"),
    ({"target_modules": ["q_proj", "lm_head"]}, "target_modules"),
])
def test_dpo_engine_options_out_of_range_are_400s_naming_the_key(client, hyperparameters, param):
    pairs = upload_ok(client, pairs_jsonl())["id"]
    response = create_job(client, pairs, method={"type": "dpo", "dpo": {"hyperparameters": hyperparameters}})
    assert_error(response, 400, code=response.json()["error"]["code"], param=f"method.dpo.hyperparameters.{param}")


def test_dpo_options_on_a_supervised_job_are_refused(client):
    examples = upload_ok(client)["id"]
    response = create_job(client, examples, method={"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}})
    error = assert_error(response, 400, code=response.json()["error"]["code"], param="method.supervised.hyperparameters.beta")
    assert "only to method 'dpo'" in error["message"]
    pairs = upload_ok(client, pairs_jsonl())["id"]
    assert_error(create_job(client, examples, method={"type": "dpo"}), 400, code="invalid_file_format", param="training_file")
    ok = create_job(client, pairs, method={"type": "dpo", "dpo": {"hyperparameters": {"loss_type": "orpo", "rpo_alpha": 1.0}}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["method"]["dpo"]["hyperparameters"]["loss_type"] == "orpo"
