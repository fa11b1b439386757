"""Preference files and jobs: the upload records a file's kind; a job whose method does not match is a 400 naming
the file."""

from __future__ import annotations

import json

from core.models import File
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
