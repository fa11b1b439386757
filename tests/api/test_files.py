"""/v1/files on PostgreSQL and SQLite with local object storage."""

from __future__ import annotations

import hashlib
import json

import anyio
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.tables import File
from tests.api.helpers import KEY_A, KEY_B, MAX_UPLOAD, assert_error, chat_jsonl, db, upload, upload_ok

FILE_FIELDS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "status_details", "sha256"}


def stored_objects(settings) -> list[str]:
    return sorted(str(p.relative_to(settings.storage_dir)) for p in settings.storage_dir.rglob("*") if p.is_file())


def spooled_files(settings) -> list[str]:
    tmp = settings.home / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def test_upload_valid_file_is_processed_and_downloadable(client, settings):
    content = chat_jsonl(12)
    file = upload_ok(client, content)
    assert set(file) == FILE_FIELDS
    assert file["id"].startswith("file-") and file["object"] == "file"
    assert (file["filename"], file["purpose"], file["status"]) == ("train.jsonl", "fine-tune", "processed")
    assert file["bytes"] == len(content)
    assert file["sha256"] == hashlib.sha256(content).hexdigest()
    assert file["status_details"] is None and file["expires_at"] is None

    assert client.get(f"/v1/files/{file['id']}", headers=KEY_A).json() == file
    download = client.get(f"/v1/files/{file['id']}/content", headers=KEY_A)
    assert download.status_code == 200 and download.content == content
    assert stored_objects(settings) == [f"files/{file['id']}"]
    assert spooled_files(settings) == []


def test_upload_of_bare_bytes(client):
    # What the SDK sends for `file=b"..."`: filename "upload", type application/octet-stream.
    response = client.post(
        "/v1/files", headers=KEY_A, data={"purpose": "fine-tune"}, files={"file": ("upload", chat_jsonl(), "application/octet-stream")}
    )
    assert response.status_code == 200, response.text
    assert (response.json()["filename"], response.json()["status"]) == ("upload", "processed")


def test_expires_after(client):
    file = upload_ok(client, data={"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    assert file["expires_at"] == file["created_at"] + 3600
    assert_error(
        upload(client, chat_jsonl(), data={"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"}),
        400,
        code="invalid_value",
        param="expires_after.seconds",
    )
    assert_error(
        upload(client, chat_jsonl(), data={"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}),
        400,
        code="invalid_value",
        param="expires_after.anchor",
    )
    assert_error(
        upload(client, chat_jsonl(), data={"expires_after[anchor]": "created_at"}),
        400,
        code="missing_required_parameter",
        param="expires_after.seconds",
    )


def test_malformed_lines_make_an_error_file_with_line_numbers(client, settings):
    lines = chat_jsonl(12).decode().splitlines()
    lines[1] = '{"messages": [{"role": "user", "content": "hi"}'  # truncated JSON
    lines[3] = json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]})
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    file = upload_ok(client, ("\n".join(lines) + "\n").encode())
    assert file["status"] == "error"
    details = file["status_details"]
    assert details.startswith("line 2: invalid_file_format: not valid JSON"), details
    assert "line 4: invalid_file_format:" in details and "robot" in details
    assert "line 7: invalid_file_format:" in details
    assert "invalid_n_examples" not in details  # nine good lines are enough for a file (a validation file may be small)
    # Stored anyway, as OpenAI does, but no job can use it (tests/api/test_jobs.py).
    assert stored_objects(settings) == [f"files/{file['id']}"]
    assert client.get(f"/v1/files/{file['id']}", headers=KEY_A).json()["status"] == "error"


def test_many_faults_are_summarized_with_their_count(client):
    content = b"".join(b"not json\n" for _ in range(12))
    details = upload_ok(client, content)["status_details"]
    assert details.count("invalid_file_format") == 5
    assert "line 12" not in details
    assert details.endswith("(13 problems in all)"), details  # 12 lines, and no valid example at all:
    assert "invalid_n_examples: Training file has 0 example(s)" in details  # the whole-file fault is always shown


def test_a_small_file_is_processed(client):
    # Fewer examples than a training file needs: fine as a validation file, so the upload is processed.
    assert upload_ok(client, chat_jsonl(3))["status"] == "processed"


def test_binary_file_is_an_error(client):
    file = upload_ok(client, bytes(range(256)) * 4)
    assert file["status"] == "error"
    assert "line 1: invalid_file_format:" in file["status_details"] and "UTF-8" in file["status_details"]


def test_oversized_upload_is_refused_and_nothing_is_stored(client, settings):
    content = b"x" * (MAX_UPLOAD + 1)
    # Declared Content-Length well over the limit: refused before the body is read.
    assert_error(upload(client, b"x" * (MAX_UPLOAD + 128 * 1024)), 413, code="file_too_large", param="file")
    # Within the multipart allowance but over the limit by one byte: refused while copying.
    assert_error(upload(client, content), 413, code="file_too_large", param="file")
    # No Content-Length at all (chunked): cut off while the body arrives.
    body = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    )

    def chunks():
        yield body
        for _ in range(4):
            yield b"y" * MAX_UPLOAD
        yield b"\r\n--b--\r\n"

    response = client.post("/v1/files", headers={**KEY_A, "content-type": "multipart/form-data; boundary=b"}, content=chunks())
    assert "content-length" not in response.request.headers
    assert_error(response, 413, code="file_too_large", param="file")

    with db(client) as session:
        assert session.scalars(select(File)).all() == []
    assert stored_objects(settings) == [] and spooled_files(settings) == []
    # The limit itself is accepted.
    assert upload_ok(client, b"x" * MAX_UPLOAD)["bytes"] == MAX_UPLOAD


def test_a_chunked_upload_is_cut_off_while_it_arrives(client):
    """Without a Content-Length the body is read only until it passes the limit (httpx's ASGI transport hands
    the body to the app chunk by chunk, as a server does)."""
    sent = 0

    async def body():
        nonlocal sent
        yield (
            b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        )
        for _ in range(100):
            sent += 1
            yield b"y" * (MAX_UPLOAD // 4)
        yield b"\r\n--b--\r\n"

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            return await http.post("/v1/files", headers={**KEY_A, "content-type": "multipart/form-data; boundary=b"}, content=body())

    assert_error(anyio.run(post), 413, code="file_too_large", param="file")
    assert sent < 10  # the limit (4 chunks) plus the multipart allowance, not the 100 chunks offered


def test_purpose_and_missing_fields(client):
    assert_error(upload(client, chat_jsonl(), purpose="batch"), 400, code="unsupported_value", param="purpose")
    assert_error(upload(client, chat_jsonl(), purpose="fine-tune-results"), 400, code="unsupported_value", param="purpose")
    missing_purpose = client.post("/v1/files", headers=KEY_A, files={"file": ("a.jsonl", chat_jsonl(), "application/jsonl")})
    assert_error(missing_purpose, 400, code="missing_required_parameter", param="purpose")
    missing_file = client.post("/v1/files", headers=KEY_A, files={"purpose": (None, "fine-tune")})
    assert_error(missing_file, 400, code="missing_required_parameter", param="file")


def test_list_pagination_and_order(client):
    ids = [upload_ok(client, filename=f"f{i}.jsonl")["id"] for i in range(5)]
    newest_first = client.get("/v1/files", headers=KEY_A).json()
    assert newest_first["object"] == "list" and newest_first["has_more"] is False
    assert [f["id"] for f in newest_first["data"]] == ids[::-1]
    assert (newest_first["first_id"], newest_first["last_id"]) == (ids[4], ids[0])

    page = client.get("/v1/files", headers=KEY_A, params={"limit": 2, "order": "asc"}).json()
    assert [f["id"] for f in page["data"]] == ids[:2] and page["has_more"] is True
    page = client.get("/v1/files", headers=KEY_A, params={"limit": 2, "order": "asc", "after": page["last_id"]}).json()
    assert [f["id"] for f in page["data"]] == ids[2:4] and page["has_more"] is True
    page = client.get("/v1/files", headers=KEY_A, params={"limit": 2, "order": "asc", "after": page["last_id"]}).json()
    assert [f["id"] for f in page["data"]] == ids[4:] and page["has_more"] is False
    # Old SDKs stop only on an empty page.
    page = client.get("/v1/files", headers=KEY_A, params={"order": "asc", "after": ids[4]}).json()
    assert page == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    page = client.get("/v1/files", headers=KEY_A, params={"limit": 3, "after": ids[3]}).json()
    assert [f["id"] for f in page["data"]] == ids[2::-1]

    assert client.get("/v1/files", headers=KEY_A, params={"purpose": "fine-tune-results"}).json()["data"] == []
    assert_error(client.get("/v1/files", headers=KEY_A, params={"limit": 0}), 400, code="invalid_value", param="limit")
    assert_error(client.get("/v1/files", headers=KEY_A, params={"limit": "many"}), 400, code="invalid_type", param="limit")
    assert_error(client.get("/v1/files", headers=KEY_A, params={"order": "up"}), 400, code="invalid_value", param="order")
    assert_error(client.get("/v1/files", headers=KEY_A, params={"after": "file-nope"}), 400, code="invalid_value", param="after")


def test_delete(client, settings):
    keep, gone = upload_ok(client)["id"], upload_ok(client)["id"]
    response = client.delete(f"/v1/files/{gone}", headers=KEY_A)
    assert response.status_code == 200 and response.json() == {"id": gone, "object": "file", "deleted": True}
    assert stored_objects(settings) == [f"files/{keep}"]
    assert_error(client.get(f"/v1/files/{gone}", headers=KEY_A), 404, code="file_not_found", param="file_id")
    assert_error(client.get(f"/v1/files/{gone}/content", headers=KEY_A), 404, code="file_not_found", param="file_id")
    assert_error(client.delete(f"/v1/files/{gone}", headers=KEY_A), 404, code="file_not_found", param="file_id")
    assert [f["id"] for f in client.get("/v1/files", headers=KEY_A).json()["data"]] == [keep]


def test_another_projects_file_is_invisible(client, settings):
    file_id = upload_ok(client, headers=KEY_A)["id"]
    for response in (
        client.get(f"/v1/files/{file_id}", headers=KEY_B),
        client.get(f"/v1/files/{file_id}/content", headers=KEY_B),
        client.delete(f"/v1/files/{file_id}", headers=KEY_B),
    ):
        assert_error(response, 404, code="file_not_found", param="file_id")
    assert client.get("/v1/files", headers=KEY_B).json()["data"] == []
    assert_error(client.get("/v1/files", headers=KEY_B, params={"after": file_id}), 400, code="invalid_value", param="after")
    assert stored_objects(settings) == [f"files/{file_id}"]
    assert [f["id"] for f in client.get("/v1/files", headers=KEY_A).json()["data"]] == [file_id]


def test_result_files_of_workers_are_readable(client):
    """A worker stores a CSV with purpose fine-tune-results; the client lists and downloads it like any file."""
    upload_ok(client)
    csv = b"step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,2.5,0.1,,\n"
    client.app.state.storage.put_file("results/r1.csv", _write(client, csv))
    with db(client) as session:
        session.add(
            File(
                id="file-results1",
                project="proj-a",
                filename="step_metrics.csv",
                purpose="fine-tune-results",
                bytes=len(csv),
                sha256=hashlib.sha256(csv).hexdigest(),
                status="processed",
                storage_key="results/r1.csv",
            )
        )
    listed = client.get("/v1/files", headers=KEY_A, params={"purpose": "fine-tune-results"}).json()["data"]
    assert [f["id"] for f in listed] == ["file-results1"] and listed[0]["purpose"] == "fine-tune-results"
    download = client.get("/v1/files/file-results1/content", headers=KEY_A)
    assert download.status_code == 200 and download.content == csv
    assert download.headers["content-type"] == "application/octet-stream"


def _write(client, content: bytes):
    path = client.app.state.settings.home / "result.csv"
    path.write_bytes(content)
    return path


class _CommitFailsForFiles(Session):
    def commit(self) -> None:
        if any(isinstance(obj, File) for obj in self.new):
            raise RuntimeError("database went away")
        super().commit()


def test_a_failed_commit_leaves_no_object_and_no_temp_file(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    app = create_app(settings)
    app.state.session_factory = sessionmaker(app.state.session_factory.kw["bind"], class_=_CommitFailsForFiles, expire_on_commit=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_error(upload(client, chat_jsonl()), 500, code="internal_error", type="server_error")
        assert "x-should-retry" not in upload(client, chat_jsonl()).headers
        assert client.get("/v1/files", headers=KEY_A).json()["data"] == []
    assert stored_objects(settings) == [] and spooled_files(settings) == []


@pytest.mark.parametrize("bad_name", ["a" * 513])
def test_overlong_filename(client, bad_name):
    assert_error(upload(client, chat_jsonl(), filename=bad_name), 400, code="invalid_value", param="file")


def test_an_expired_file_is_gone_for_every_reader(client):
    from core.tables import now

    file = upload_ok(client, data={"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    kept = upload_ok(client)
    with db(client) as session:
        session.get(File, session.scalar(select(File.seq).where(File.id == file["id"]))).expires_at = now() - 1
    assert_error(client.get(f"/v1/files/{file['id']}", headers=KEY_A), 404, code="file_not_found", param="file_id")
    assert_error(client.get(f"/v1/files/{file['id']}/content", headers=KEY_A), 404, code="file_not_found", param="file_id")
    assert [f["id"] for f in client.get("/v1/files", headers=KEY_A).json()["data"]] == [kept["id"]]
    response = client.post("/v1/fine_tuning/jobs", headers=KEY_A, json={"model": "tiny-llama", "training_file": file["id"]})
    assert_error(response, 400, code="file_not_found", param="training_file")
