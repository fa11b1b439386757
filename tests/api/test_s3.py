"""The API on S3 storage (moto's S3-compatible server): uploads land in the bucket, downloads and deletes go
through it, and a refused upload leaves the bucket empty."""

from __future__ import annotations

import secrets

import boto3
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.storage import S3Storage
from core.tables import Checkpoint
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, MAX_UPLOAD, assert_error, chat_jsonl, create_job_ok, db, upload, upload_ok


@pytest.fixture
def s3_client(tmp_path, sqlite_url, redis_url, queue_name, models_dir, s3_endpoint, aws_test_credentials):
    bucket = f"qlora-api-{secrets.token_hex(4)}"
    settings = make_settings(
        tmp_path,
        sqlite_url,
        redis_url,
        queue_name,
        models_dir,
        storage="s3",
        s3_bucket=bucket,
        s3_endpoint=s3_endpoint,
        s3_region="us-east-1",
    )
    app = create_app(settings)
    assert isinstance(app.state.storage, S3Storage)
    app.state.storage.ensure_bucket()
    with TestClient(app) as client:
        yield client


def bucket_keys(client) -> list[str]:
    storage = client.app.state.storage
    listed = storage.client.list_objects_v2(Bucket=storage.bucket)
    return sorted(obj["Key"] for obj in listed.get("Contents", []))


def test_files_on_s3(s3_client):
    content = chat_jsonl()
    file = upload_ok(s3_client, content)
    assert file["status"] == "processed"
    assert bucket_keys(s3_client) == [f"files/{file['id']}"]
    download = s3_client.get(f"/v1/files/{file['id']}/content", headers=KEY_A)
    assert download.status_code == 200 and download.content == content

    assert_error(upload(s3_client, b"x" * (MAX_UPLOAD + 1)), 413, code="file_too_large", param="file")
    assert bucket_keys(s3_client) == [f"files/{file['id']}"]

    assert s3_client.delete(f"/v1/files/{file['id']}", headers=KEY_A).json()["deleted"] is True
    assert bucket_keys(s3_client) == []
    assert s3_client.get("/v1/files", headers=KEY_A).json()["data"] == []


def test_checkpoint_archive_from_s3(s3_client):
    job = create_job_ok(s3_client, upload_ok(s3_client)["id"])
    storage = s3_client.app.state.storage
    key = f"checkpoints/{job['id']}/step-1.tar.gz"
    boto3.client("s3", endpoint_url=storage.client.meta.endpoint_url).put_object(Bucket=storage.bucket, Key=key, Body=b"archive")
    with db(s3_client) as session:
        session.add(
            Checkpoint(
                id="ftckpt_s3",
                job_id=job["id"],
                step=1,
                metrics={"step": 1.0},
                storage_key=key,
                fine_tuned_model_checkpoint="ft:x:ckpt-step-1",
            )
        )
    response = s3_client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/ftckpt_s3/content", headers=KEY_A)
    assert response.status_code == 200 and response.content == b"archive"
    # A row whose object is gone is a 404, not a 500.
    storage.delete(key)
    assert_error(
        s3_client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/ftckpt_s3/content", headers=KEY_A),
        404,
        code="checkpoint_not_found",
        param="checkpoint_id",
    )


def test_readiness_on_s3(s3_client):
    """The short-timeout probe reaches a store that answers: ready (a missing probe object is an answer)."""
    ready = s3_client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["storage"] == "ok"
