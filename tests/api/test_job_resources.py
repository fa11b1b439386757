"""A job's checkpoints, metrics and checkpoint archives, with rows written as a worker writes them."""

from __future__ import annotations

import pytest

from core import ids
from core.model_names import checkpoint_model_name, fine_tuned_model_name
from core.tables import Checkpoint, JobMetric
from tests.api.helpers import KEY_A, KEY_B, assert_error, create_job_ok, db, upload_ok


@pytest.fixture
def job(client) -> dict:
    return create_job_ok(client, upload_ok(client)["id"], suffix="demo")


def add_checkpoints(client, job: dict, steps: list[int]) -> list[str]:
    """Checkpoint rows and their archives, as the worker stores them; returns the ids in step order."""
    model = fine_tuned_model_name(job["model"], job["organization_id"], "demo", job["id"])
    checkpoint_ids = []
    with db(client) as session:
        for step in steps:
            archive = client.app.state.settings.home / f"ckpt-{step}.tar.gz"
            archive.write_bytes(b"\x1f\x8b fake archive of step %d" % step)
            key = f"checkpoints/{job['id']}/step-{step}.tar.gz"
            client.app.state.storage.put_file(key, archive)
            checkpoint = Checkpoint(
                id=ids.checkpoint_id(),
                job_id=job["id"],
                step=step,
                storage_key=key,
                metrics={"step": step, "train_loss": 3.0 / step, "train_mean_token_accuracy": 0.5, "valid_loss": None},
                fine_tuned_model_checkpoint=checkpoint_model_name(model, step),
            )
            session.add(checkpoint)
            session.flush()
            checkpoint_ids.append(checkpoint.id)
    return checkpoint_ids


def test_checkpoints_newest_first_with_pagination(client, job):
    checkpoint_ids = add_checkpoints(client, job, [10, 20, 30])
    url = f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"
    listed = client.get(url, headers=KEY_A).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [c["id"] for c in listed["data"]] == checkpoint_ids[::-1]
    assert (listed["first_id"], listed["last_id"]) == (checkpoint_ids[2], checkpoint_ids[0])
    newest = listed["data"][0]
    assert set(newest) == {"id", "object", "created_at", "fine_tuned_model_checkpoint", "fine_tuning_job_id", "step_number", "metrics"}
    assert newest["id"].startswith("ftckpt_") and newest["object"] == "fine_tuning.job.checkpoint"
    assert (newest["fine_tuning_job_id"], newest["step_number"]) == (job["id"], 30)
    assert newest["fine_tuned_model_checkpoint"] == f"ft:tiny-llama:proj-a:demo:{job['id'].removeprefix('ftjob-')}:ckpt-step-30"
    assert newest["metrics"] == {"step": 30.0, "train_loss": 0.1, "train_mean_token_accuracy": 0.5}
    assert all(isinstance(v, float) for v in newest["metrics"].values())

    page = client.get(url, headers=KEY_A, params={"limit": 2}).json()
    assert [c["step_number"] for c in page["data"]] == [30, 20] and page["has_more"] is True
    page = client.get(url, headers=KEY_A, params={"limit": 2, "after": page["last_id"]}).json()
    assert [c["step_number"] for c in page["data"]] == [10] and page["has_more"] is False
    assert client.get(url, headers=KEY_A, params={"after": checkpoint_ids[0]}).json()["data"] == []
    assert_error(client.get(url, headers=KEY_B), 404, code="job_not_found", param="job_id")


def test_checkpoint_content(client, job):
    first, second = add_checkpoints(client, job, [5, 10])
    url = f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/{second}/content"
    response = client.get(url, headers=KEY_A)
    assert response.status_code == 200 and response.content == b"\x1f\x8b fake archive of step 10"
    assert response.headers["content-type"] == "application/gzip"
    assert f'filename="{second}.tar.gz"' in response.headers["content-disposition"]
    assert_error(client.get(url, headers=KEY_B), 404, code="job_not_found", param="job_id")
    missing = f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/ftckpt_nope/content"
    assert_error(client.get(missing, headers=KEY_A), 404, code="checkpoint_not_found", param="checkpoint_id")
    # A checkpoint of another job is not found under this one.
    other_job = create_job_ok(client, job["training_file"])
    assert_error(
        client.get(f"/v1/fine_tuning/jobs/{other_job['id']}/checkpoints/{first}/content", headers=KEY_A),
        404,
        code="checkpoint_not_found",
        param="checkpoint_id",
    )


def test_metrics_ascending_by_step_with_pagination(client, job):
    with db(client) as session:
        for step in (3, 1, 2, 4):  # written out of order: listed by step
            session.add(JobMetric(job_id=job["id"], step=step, values={"train_loss": 1.0 / step, "train_mean_token_accuracy": 0.1 * step}))
    url = f"/v1/fine_tuning/jobs/{job['id']}/metrics"
    listed = client.get(url, headers=KEY_A).json()
    assert listed == {
        "object": "list",
        "has_more": False,
        "data": [{"step": s, "train_loss": 1.0 / s, "train_mean_token_accuracy": 0.1 * s} for s in (1, 2, 3, 4)],
    }
    page = client.get(url, headers=KEY_A, params={"limit": 2}).json()
    assert [m["step"] for m in page["data"]] == [1, 2] and page["has_more"] is True
    page = client.get(url, headers=KEY_A, params={"limit": 2, "after": 2}).json()
    assert [m["step"] for m in page["data"]] == [3, 4] and page["has_more"] is False
    assert client.get(url, headers=KEY_A, params={"after": 4}).json()["data"] == []
    assert_error(client.get(url, headers=KEY_A, params={"after": "x"}), 400, code="invalid_type", param="after")
    assert_error(client.get(url, headers=KEY_B), 404, code="job_not_found", param="job_id")
