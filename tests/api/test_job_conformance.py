"""Two details of OpenAI's job objects, read through the official SDK in strict mode: `estimated_finish` only while a
job runs, and a checkpoint's `full_valid_loss` / `full_valid_mean_token_accuracy` for a step that evaluated."""

from __future__ import annotations

import openai
import pytest
from sqlalchemy import update

from core import ids
from core.jobs import cancel_job, claim_job, fail_job, succeed_job
from core.tables import Checkpoint, Job, now
from tests.api.helpers import create_job_ok, db, upload_ok


@pytest.fixture
def sdk(client):
    return openai.OpenAI(api_key="key-a", base_url="http://testserver/v1", http_client=client, max_retries=0,
                         _strict_response_validation=True)


def running_job(client, estimated_finish: int) -> str:
    job_id = create_job_ok(client, upload_ok(client)["id"])["id"]
    with db(client) as session:
        assert claim_job(session, job_id, "worker-1")
        session.execute(update(Job).where(Job.id == job_id).values(estimated_finish=estimated_finish))
    return job_id


@pytest.mark.parametrize("end", ["succeeded", "failed", "cancelled"])
def test_estimated_finish_is_null_once_the_job_stops_running(client, sdk, end):
    at = now() + 600
    job_id = running_job(client, at)
    assert sdk.fine_tuning.jobs.retrieve(job_id).estimated_finish == at
    with db(client) as session:
        if end == "succeeded":
            assert succeed_job(session, job_id, "worker-1", fine_tuned_model=f"ft:x:proj-a::{job_id}", trained_tokens=1, result_files=[])
        elif end == "failed":
            fail_job(session, job_id, code="error", message="boom")
        else:
            assert cancel_job(session, job_id)
    job = sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.status == end and job.estimated_finish is None
    assert [j.estimated_finish for j in sdk.fine_tuning.jobs.list() if j.id == job_id] == [None]


def test_a_checkpoint_that_evaluated_carries_the_full_validation_metrics(client, sdk):
    job_id = running_job(client, now() + 600)
    with db(client) as session:
        for step, metrics in ((1, {"step": 1, "train_loss": 2.0, "train_mean_token_accuracy": 0.5}),
                              (2, {"step": 2, "train_loss": 1.5, "train_mean_token_accuracy": 0.6, "valid_loss": 1.75,
                                   "valid_mean_token_accuracy": 0.55})):
            session.add(Checkpoint(id=ids.checkpoint_id(), job_id=job_id, step=step, metrics=metrics, storage_key=f"k{step}",
                                   fine_tuned_model_checkpoint=f"ft:x:ckpt-step-{step}", created_at=now()))
    evaluated, trained_only = list(sdk.fine_tuning.jobs.checkpoints.list(job_id))
    assert evaluated.step_number == 2
    assert (evaluated.metrics.full_valid_loss, evaluated.metrics.full_valid_mean_token_accuracy) == (1.75, 0.55)
    assert (evaluated.metrics.valid_loss, evaluated.metrics.valid_mean_token_accuracy) == (1.75, 0.55)
    assert trained_only.metrics.full_valid_loss is None and trained_only.metrics.valid_loss is None
