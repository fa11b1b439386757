"""The API's log lines: under QLORA_LOG_FORMAT=json every line a real uvicorn process writes is one JSON object, and
those logged while a request is handled (uvicorn's access line, the routes' own) carry its x-request-id."""

from __future__ import annotations

import io
import json
import logging

import httpx

from core.logs import bound, configure_logging
from tests.api.helpers import API_KEYS, KEY_A, MAX_UPLOAD, MODEL, upload_ok
from tests.api.processes import api_env, uvicorn_api


def test_the_api_process_logs_json_lines_with_the_request_id(tmp_path, sqlite_url, redis_url, queue_name, models_dir):
    env = api_env(home=str(tmp_path / "home"), database_url=sqlite_url, broker_url=redis_url, task_queue=queue_name,
                  models_dir=str(models_dir), storage="local", api_keys=API_KEYS, max_upload_bytes=str(MAX_UPLOAD), log_format="json")
    log = tmp_path / "api.log"
    with uvicorn_api(env, log) as url, httpx.Client(base_url=url, timeout=30) as client:
        file_id = upload_ok(client, headers={**KEY_A, "x-request-id": "req-test-upload"})["id"]
        created = client.post("/v1/fine_tuning/jobs", headers={**KEY_A, "x-request-id": "req-test-job"},
                              json={"model": MODEL, "training_file": file_id})
        assert created.status_code == 200, created.text
        assert created.headers["x-request-id"] == "req-test-job"
        refused = client.get("/v1/files", headers={"Authorization": "Bearer wrong"})  # an id the API makes up
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, the server's start and stop included
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    access = {(r["method"], r["path"], r["status_code"]): r.get("request_id") for r in records if r["logger"] == "uvicorn.access"}
    assert access[("POST", "/v1/files", 200)] == "req-test-upload"
    assert access[("POST", "/v1/fine_tuning/jobs", 200)] == "req-test-job"
    assert access[("GET", "/v1/files", 401)] == refused.headers["x-request-id"]
    # A line logged while the route runs (in the thread pool that runs sync routes) carries it too.
    [sent] = [r for r in records if r["message"].startswith(f"job {created.json()['id']} sent to the training queue")]
    assert sent["request_id"] == "req-test-job" and sent["logger"] == "core.job_service"  # job creation lives there
    assert any(r["logger"] == "uvicorn.error" and r["message"].startswith("Started server process") for r in records)


def test_text_lines_are_readable_and_name_the_context():
    stream = io.StringIO()
    handler = configure_logging("text", stream=stream)
    try:
        with bound(request_id="req-1", job_id="ftjob-1"):
            logging.getLogger("api").warning("something %s", "happened")
        logging.getLogger("api").warning("outside")
    finally:
        logging.getLogger().removeHandler(handler)
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("WARNING api: something happened [request_id=req-1 job_id=ftjob-1]")
    assert outside.endswith("WARNING api: outside")


def test_json_lines_carry_extras_but_not_terminal_colours():
    stream = io.StringIO()
    handler = configure_logging("json", stream=stream)
    try:
        # uvicorn's own loggers may be at WARNING after another test served an app: a logger of the test's own, with
        # the extra that uvicorn passes.
        logging.getLogger("qlora.test.logs").info("Started %d", 7, extra={"color_message": "Started \x1b[36m%d\x1b[0m", "attempt": 2})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("api").exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    started, failed = (json.loads(line) for line in stream.getvalue().splitlines())  # the traceback inside its line
    assert started["message"] == "Started 7" and started["attempt"] == 2 and "color_message" not in started
    assert failed["level"] == "ERROR" and failed["exception"].startswith("Traceback") and "ValueError: boom" in failed["exception"]
