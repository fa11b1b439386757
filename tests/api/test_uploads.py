"""The Uploads API (POST /v1/uploads, parts, complete, cancel) through the official SDK, on local storage and S3,
its refusals, its reservation against the stored-bytes limit, the sweeper's removal of parts, and the memory of a
real API process receiving a large upload."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time

import httpx
import openai
import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.main import create_app
from core.storage import S3_MIN_PART
from core.tables import Upload, UploadPart
from core.uploads import MAX_PART_BYTES
from tests.api.conftest import make_settings
from tests.api.helpers import KEY_A, KEY_B, assert_error, chat_jsonl, db
from tests.api.processes import api_env, uvicorn_api
from worker.sweeper import sweep


def sdk_for(client: httpx.Client, key: str = "key-a") -> openai.OpenAI:
    """The official SDK on the test client, strict: every response must match its types."""
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0, _strict_response_validation=True)


@pytest.fixture
def sdk(client):
    return sdk_for(client)


def stored_objects(client) -> list[str]:
    root = client.app.state.storage.root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def create(client, size: int, headers=KEY_A, **extra) -> httpx.Response:
    body = {"filename": "big.jsonl", "purpose": "fine-tune", "bytes": size, "mime_type": "text/jsonl"} | extra
    return client.post("/v1/uploads", json=body, headers=headers)


def add_part(client, upload_id: str, data: bytes, headers=KEY_A) -> httpx.Response:
    return client.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("blob", data)}, headers=headers)


def test_upload_file_chunked_round_trips(sdk, client, tmp_path):
    content = chat_jsonl(40)
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    # Parts of 500 bytes: several, cut mid-line, so the file is valid only when joined in order.
    upload = sdk.uploads.upload_file_chunked(file=path, mime_type="text/jsonl", purpose="fine-tune", part_size=500,
                                             md5=hashlib.md5(content).hexdigest())
    assert upload.status == "completed" and upload.filename == "train.jsonl" and upload.bytes == len(content)
    file = upload.file
    assert file is not None and file.status == "processed" and file.bytes == len(content)
    assert file.model_extra["sha256"] == hashlib.sha256(content).hexdigest()
    assert sdk.files.content(file.id).content == content
    assert sdk.files.retrieve(file.id).status == "processed"
    # The parts are gone once the file is made; only the file's object is left.
    assert stored_objects(client) == [f"files/{file.id}"]
    with db(client) as session:
        assert session.scalars(select(UploadPart)).all() == []
    # The file trains like any upload.
    job = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=file.id)
    assert job.status == "queued"


def test_parts_in_another_order_and_a_bad_file(client):
    lines = chat_jsonl(12).splitlines(keepends=True)
    first, second = b"".join(lines[:6]), b"".join(lines[6:])
    upload = create(client, len(first) + len(second)).json()
    p1 = add_part(client, upload["id"], second).json()["id"]
    p2 = add_part(client, upload["id"], first).json()["id"]
    done = client.post(f"/v1/uploads/{upload['id']}/complete", json={"part_ids": [p2, p1]}, headers=KEY_A).json()
    assert done["status"] == "completed"
    assert client.get(f"/v1/files/{done['file']['id']}/content", headers=KEY_A).content == first + second

    bad = b'{"messages": "nope"}\n' * 3
    upload = create(client, len(bad)).json()
    part = add_part(client, upload["id"], bad).json()["id"]
    done = client.post(f"/v1/uploads/{upload['id']}/complete", json={"part_ids": [part]}, headers=KEY_A).json()
    # Validated like POST /v1/files: stored, with status error and the faults named.
    assert done["file"]["status"] == "error" and "line 1: invalid_file_format" in done["file"]["status_details"]


def test_bad_input_is_a_400_naming_the_problem(client):
    content = chat_jsonl(4)
    upload = create(client, len(content)).json()
    assert upload["status"] == "pending" and upload["expires_at"] == upload["created_at"] + 3600
    other = create(client, len(content)).json()
    other_part = add_part(client, other["id"], content).json()["id"]
    half = len(content) // 2
    p1 = add_part(client, upload["id"], content[:half]).json()["id"]
    complete = f"/v1/uploads/{upload['id']}/complete"

    assert_error(client.post(complete, json={"part_ids": [p1]}, headers=KEY_A), 400, code="upload_bytes_mismatch", param="part_ids")
    assert_error(client.post(complete, json={"part_ids": [p1, other_part]}, headers=KEY_A), 400, code="invalid_part", param="part_ids")
    assert_error(client.post(complete, json={"part_ids": [p1, p1]}, headers=KEY_A), 400, code="invalid_part", param="part_ids")
    assert_error(client.post(complete, json={"part_ids": ["part_nope"]}, headers=KEY_A), 400, code="invalid_part", param="part_ids")
    assert_error(add_part(client, upload["id"], content), 400, code="upload_bytes_exceeded", param="data")
    p2 = add_part(client, upload["id"], content[half:]).json()["id"]
    wrong = client.post(complete, json={"part_ids": [p1, p2], "md5": hashlib.md5(b"other").hexdigest()}, headers=KEY_A)
    assert_error(wrong, 400, code="md5_mismatch", param="md5")
    # A failed completion leaves the upload pending, its parts intact: the right call then succeeds, once.
    right = client.post(complete, json={"part_ids": [p1, p2], "md5": hashlib.md5(content).hexdigest()}, headers=KEY_A)
    assert right.status_code == 200 and right.json()["status"] == "completed"
    assert_error(client.post(complete, json={"part_ids": [p1, p2]}, headers=KEY_A), 400, code="upload_completed", param="upload_id")
    assert_error(add_part(client, upload["id"], b"x"), 400, code="upload_completed", param="upload_id")
    assert_error(client.post(f"/v1/uploads/{upload['id']}/cancel", headers=KEY_A), 400, code="upload_completed", param="upload_id")

    cancelled = client.post(f"/v1/uploads/{other['id']}/cancel", headers=KEY_A).json()
    assert cancelled["status"] == "cancelled"
    assert_error(client.post(f"/v1/uploads/{other['id']}/complete", json={"part_ids": [other_part]}, headers=KEY_A), 400,
                 code="upload_cancelled", param="upload_id")
    assert_error(add_part(client, other["id"], b"x"), 400, code="upload_cancelled", param="upload_id")
    # Cancelling removed the part's object at once.
    assert not any(key.startswith(f"uploads/{other['id']}") for key in stored_objects(client))

    # Another project sees none of it.
    assert_error(add_part(client, upload["id"], b"x", headers=KEY_B), 404, code="upload_not_found", param="upload_id")
    assert_error(create(client, 10, purpose="batch"), 400, code="unsupported_value", param="purpose")
    assert_error(create(client, 0), 400, code="invalid_value", param="bytes")
    assert_error(create(client, 10, filename="a\x00b"), 400, code="invalid_value", param="filename")
    empty = create(client, 10).json()
    assert_error(add_part(client, empty["id"], b""), 400, code="invalid_value", param="data")


def test_part_and_upload_size_limits(client):
    limit = client.app.state.settings.max_multipart_upload_bytes
    assert limit == 8 << 30
    assert_error(create(client, limit + 1), 400, code="invalid_value", param="bytes")
    upload = create(client, MAX_PART_BYTES + 2).json()
    # Refused from its Content-Length, before the body is read.
    oversized = client.post(f"/v1/uploads/{upload['id']}/parts", headers={**KEY_A, "content-type": "multipart/form-data; boundary=x",
                                                                          "content-length": str(MAX_PART_BYTES + 10**6)}, content=b"--x--")
    assert_error(oversized, 413, code="file_too_large", param="data")


def test_uploads_reserve_stored_bytes_from_creation(tmp_path, database_url, redis_url, queue_name, models_dir):
    settings = make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, max_stored_bytes_per_project=1000)
    with TestClient(create_app(settings)) as client:
        first = create(client, 600).json()
        assert_error(create(client, 600), 429, code="quota_exceeded", type="quota_error")
        assert_error(client.post("/v1/files", files={"file": ("a.jsonl", chat_jsonl(8))}, data={"purpose": "fine-tune"}, headers=KEY_A),
                     429, code="quota_exceeded", type="quota_error")
        assert create(client, 600, headers=KEY_B).status_code == 200  # per project
        client.post(f"/v1/uploads/{first['id']}/cancel", headers=KEY_A)
        assert create(client, 600).status_code == 200  # a cancelled upload reserves nothing


def test_the_sweeper_expires_uploads_and_removes_their_parts(client):
    content = chat_jsonl(4)
    upload = create(client, len(content)).json()
    add_part(client, upload["id"], content[:10])
    cancelled = create(client, len(content)).json()
    add_part(client, cancelled["id"], content[:10])
    live = create(client, len(content)).json()
    add_part(client, live["id"], content[:10])
    with db(client) as session:
        session.execute(update(Upload).where(Upload.id == upload["id"]).values(expires_at=int(time.time()) - 1))
        # A cancel whose part deletion failed (the process died): the part's row and object are still there.
        session.execute(update(Upload).where(Upload.id == cancelled["id"]).values(status="cancelled"))
    assert_error(add_part(client, upload["id"], b"x"), 400, code="upload_expired", param="upload_id")
    result = sweep(client.app.state.settings, client.app.state.session_factory, RecordingCelery(), client.app.state.storage)
    assert sorted(result["cleaned_uploads"]) == sorted([upload["id"], cancelled["id"]])
    assert [key.split("/")[1] for key in stored_objects(client)] == [live["id"]]
    with db(client) as session:
        assert session.scalar(select(Upload.status).where(Upload.id == upload["id"])) == "expired"
        assert {p.upload_id for p in session.scalars(select(UploadPart))} == {live["id"]}


class RecordingCelery:
    def send_task(self, *args, **kwargs):  # noqa: ANN002, ANN003
        pass


@pytest.fixture
def s3_client(tmp_path, sqlite_url, redis_url, queue_name, models_dir, s3_endpoint, aws_test_credentials):
    settings = make_settings(tmp_path, sqlite_url, redis_url, queue_name, models_dir, storage="s3", s3_bucket=f"qlora-up-{secrets.token_hex(4)}",
                             s3_endpoint=s3_endpoint, s3_region="us-east-1", max_upload_bytes=64 << 20)
    app = create_app(settings)
    app.state.storage.ensure_bucket()
    with TestClient(app) as client:
        yield client


def test_upload_on_s3_joins_parts_with_a_multipart_upload(s3_client):
    storage = s3_client.app.state.storage
    sdk = sdk_for(s3_client)
    line = json.dumps({"text": "x" * 1000}).encode() + b"\n"
    content = line * ((2 * S3_MIN_PART) // len(line) + 50)  # two parts of 5 MiB and a small tail: copied server-side
    upload = sdk.uploads.upload_file_chunked(file=content, filename="big.jsonl", bytes=len(content), mime_type="text/jsonl",
                                             purpose="fine-tune", part_size=S3_MIN_PART)
    assert upload.file.status == "processed" and upload.file.bytes == len(content)
    head = storage.client.head_object(Bucket=storage.bucket, Key=f"files/{upload.file.id}")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object of three parts
    assert b"".join(storage.iter_bytes(f"files/{upload.file.id}")) == content
    # Small parts (below S3's 5 MiB minimum) are joined through a temporary file instead.
    small = sdk.uploads.upload_file_chunked(file=chat_jsonl(30), filename="s.jsonl", bytes=len(chat_jsonl(30)), mime_type="text/jsonl",
                                            purpose="fine-tune", part_size=300)
    assert b"".join(storage.iter_bytes(f"files/{small.file.id}")) == chat_jsonl(30)
    listed = storage.client.list_objects_v2(Bucket=storage.bucket).get("Contents", [])
    assert sorted(obj["Key"] for obj in listed) == sorted([f"files/{upload.file.id}", f"files/{small.file.id}"])
    assert storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", []) == []


@pytest.mark.slow
def test_a_large_upload_keeps_the_api_process_small(tmp_path, postgres_url, redis_url, queue_name, models_dir):
    """300 MB in 64 MiB parts through a real uvicorn process: its peak resident memory grows by less than 100 MB."""
    line = json.dumps({"text": "y" * 100_000}).encode() + b"\n"
    path = tmp_path / "big.jsonl"
    with path.open("wb") as out:
        for _ in range(300 * 10**6 // len(line)):
            out.write(line)
    env = api_env(home=str(tmp_path / "home"), database_url=postgres_url, broker_url=redis_url, task_queue=queue_name,
                  api_keys="key-a=proj-a", models_dir=str(models_dir))
    with uvicorn_api(env, tmp_path / "api.log") as url:
        port = int(url.rsplit(":", 1)[1])
        server = next(p for p in psutil.Process().children(recursive=True)
                      if any(c.laddr.port == port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN))
        sdk = openai.OpenAI(api_key="key-a", base_url=f"{url}/v1", max_retries=0, timeout=300)
        sdk.files.list()  # the app fully imported and warmed before the baseline
        before = peak_rss(server.pid)
        upload = sdk.uploads.upload_file_chunked(file=path, mime_type="text/jsonl", purpose="fine-tune")
        grown = peak_rss(server.pid) - before
    print(f"the API's peak memory grew by {grown / 2**20:.0f} MiB for {os.path.getsize(path) / 1e6:.0f} MB")  # pytest -s shows it
    assert upload.file.status == "processed" and upload.file.bytes == os.path.getsize(path)
    assert grown < 100 * 2**20, f"the API's peak memory grew by {grown / 2**20:.0f} MiB"


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kib * 1024
