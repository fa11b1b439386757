"""Per-project limits: a project over one gets a 429 envelope naming the limit; other projects are unaffected."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, KEY_B, assert_error, chat_jsonl, create_job, upload, upload_ok


@pytest.fixture
def limited(tmp_path, database_url, redis_url, queue_name, models_dir):
    def make(**limits):
        return TestClient(create_app(make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, **limits)))
    return make


def test_active_jobs_per_project(limited):
    with limited(max_active_jobs_per_project=2) as client:
        file_a, file_b = upload_ok(client)["id"], upload_ok(client, headers=KEY_B)["id"]
        first = create_job(client, file_a).json()
        create_job(client, file_a)
        error = assert_error(create_job(client, file_a), 429, code="quota_exceeded", type="quota_error")
        assert "QLORA_MAX_ACTIVE_JOBS_PER_PROJECT" in error["message"] and "2 queued or running" in error["message"]
        assert create_job(client, file_b, headers=KEY_B).status_code == 200  # another project's first job
        assert client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel", headers=KEY_A).status_code == 200
        assert create_job(client, file_a).status_code == 200  # a finished job frees its place


def test_queued_jobs_per_project(limited):
    """Queued, not running: a project with a job running may still queue up to the limit."""
    from core.jobs import JobStatus
    from core.tables import Job
    from tests.api.helpers import db

    with limited(max_queued_jobs_per_project=1, max_active_jobs_per_project=10) as client:
        file_a = upload_ok(client)["id"]
        first = create_job(client, file_a).json()
        error = assert_error(create_job(client, file_a), 429, code="quota_exceeded", type="quota_error")
        assert "QLORA_MAX_QUEUED_JOBS_PER_PROJECT" in error["message"]
        with db(client) as session:  # a worker takes the first job
            session.get(Job, session.query(Job.seq).filter(Job.id == first["id"]).scalar()).status = JobStatus.RUNNING.value
        assert create_job(client, file_a).status_code == 200


def test_stored_bytes_per_project(limited):
    size = len(chat_jsonl())
    with limited(max_stored_bytes_per_project=int(size * 1.5)) as client:
        first = upload_ok(client)
        error = assert_error(upload(client, chat_jsonl()), 429, code="quota_exceeded", type="quota_error")
        assert "QLORA_MAX_STORED_BYTES_PER_PROJECT" in error["message"]
        assert len(client.get("/v1/files", headers=KEY_A).json()["data"]) == 1  # nothing half-stored
        upload_ok(client, headers=KEY_B)  # another project's bytes are its own
        assert client.delete(f"/v1/files/{first['id']}", headers=KEY_A).status_code == 200
        upload_ok(client)  # deleting frees the room


def test_steps_per_job(limited):
    with limited(max_steps_per_job=50) as client:
        file_id = upload_ok(client)["id"]  # 12 examples
        hyper = {"method": {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 51}}}}
        assert_error(create_job(client, file_id, **hyper), 400, code="invalid_value", param="method.supervised.hyperparameters.max_steps")
        # 12 examples, batch_size 1: 12 steps an epoch, 5 epochs = 60 steps
        assert_error(create_job(client, file_id, hyperparameters={"n_epochs": 5, "batch_size": 1}), 400, code="invalid_value",
                     param="hyperparameters.n_epochs")
        assert create_job(client, file_id, hyperparameters={"n_epochs": 4, "batch_size": 1}).status_code == 200  # 48 steps
