"""The official openai SDK drives the API unchanged (its http client is the test client)."""

from __future__ import annotations

import openai
import pytest

from tests.api.helpers import MODEL, chat_jsonl


@pytest.fixture
def sdk(client):
    # Strict: every response must match the SDK's types exactly (extra fields allowed).
    return openai.OpenAI(
        api_key="key-a", base_url="http://testserver/v1", http_client=client, max_retries=0, _strict_response_validation=True
    )


def test_sdk_round_trip(sdk, client):
    uploaded = sdk.files.create(file=chat_jsonl(), purpose="fine-tune")  # bare bytes
    assert (uploaded.filename, uploaded.status, uploaded.purpose) == ("upload", "processed", "fine-tune")
    assert uploaded.model_extra["sha256"]
    assert sdk.files.wait_for_processing(uploaded.id).status == "processed"
    assert sdk.files.content(uploaded.id).content == chat_jsonl()
    named = sdk.files.create(
        file=("train.jsonl", chat_jsonl(), "application/jsonl"),
        purpose="fine-tune",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert named.expires_at == named.created_at + 7200
    assert [f.id for f in sdk.files.list(limit=1)] == [named.id, uploaded.id]  # auto-pagination over two pages

    small = sdk.files.create(file=("valid.jsonl", chat_jsonl(3)), purpose="fine-tune")  # fewer than a training file needs
    job = sdk.fine_tuning.jobs.create(
        model=MODEL,
        training_file=uploaded.id,
        validation_file=small.id,
        suffix="sdk",
        seed=3,
        metadata={"who": "sdk"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto"}}},
        extra_body={},
    )
    assert (job.status, job.seed, job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == ("queued", 3, 2, 8)
    assert job.validation_file == small.id and job.model_extra["user_provided_suffix"] == "sdk"
    assert job.hyperparameters.model_extra["lora_r"] == 16
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 2
    sdk.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, hyperparameters={"n_epochs": 1})
    assert len(list(sdk.fine_tuning.jobs.list(limit=1))) == 2
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"who": "sdk"})] == [job.id]
    assert sdk.fine_tuning.jobs.retrieve(job.id).id == job.id
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=1))
    assert events[-1].message.startswith("Created fine-tuning job") and len(events) == 2
    assert list(sdk.fine_tuning.jobs.checkpoints.list(job.id)) == []
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert {m.id for m in sdk.models.list()} == {MODEL}
    assert sdk.models.retrieve(MODEL).owned_by == "system"

    with pytest.raises(openai.BadRequestError) as bad:
        sdk.fine_tuning.jobs.create(
            model=MODEL, training_file=uploaded.id, method={"type": "supervised", "supervised": {"hyperparameters": {"lora_rank": 8}}}
        )
    assert (bad.value.code, bad.value.param) == ("unknown_hyperparameter", "method.supervised.hyperparameters.lora_rank")
    assert bad.value.request_id
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.fine_tuning.jobs.cancel(job.id)
    assert bad.value.code == "invalid_job_status"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.files.retrieve("file-nope")
    assert missing.value.code == "file_not_found"
    other = openai.OpenAI(api_key="key-b", base_url="http://testserver/v1", http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.AuthenticationError) as denied:
        openai.OpenAI(api_key="nope", base_url="http://testserver/v1", http_client=client, max_retries=0).models.list()
    assert denied.value.code == "invalid_api_key"
    with pytest.raises(openai.APIStatusError) as too_large:
        sdk.files.create(file=b"x" * (client.app.state.settings.max_upload_bytes + 1), purpose="fine-tune")
    assert too_large.value.status_code == 413 and too_large.value.code == "file_too_large"
    assert sdk.files.delete(uploaded.id).deleted is True
