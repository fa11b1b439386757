"""The worker's log lines, as QLORA_LOG_FORMAT=json writes them: every line logged while a job or an export runs
carries its id, those of the heartbeat thread included."""

from __future__ import annotations

import io
import json
import logging
import threading

from core import ids
from core.db import session_scope
from core.jobs import cancel_job
from core.logs import configure_logging
from core.tables import Export, Job, now
from tests.worker.helpers import create_job, wait_until
from worker import export as export_worker
from worker import runner


def json_lines(run) -> list[dict]:  # noqa: ANN001
    """What the root logger writes, in JSON, while `run()` runs; every line must parse."""
    stream = io.StringIO()
    handler = configure_logging("json", stream=stream)
    try:
        run()
    finally:
        logging.getLogger().removeHandler(handler)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_of_a_job_carries_its_id(make_settings, session_factory, storage):
    job_id = create_job(session_factory, storage)
    outcome: list[str] = []
    records = json_lines(lambda: outcome.append(runner.run_job(job_id, make_settings(), session_factory, storage)))
    assert outcome == [runner.SUCCEEDED]
    messages = [r["message"] for r in records if r["logger"] == "worker.runner"]
    assert any("claimed" in m for m in messages) and any(m.endswith(": succeeded") for m in messages)
    assert records and all(r.get("job_id") == job_id for r in records), [r for r in records if r.get("job_id") != job_id]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


def test_the_heartbeat_threads_lines_carry_the_job_id(session_factory, storage):
    """The heartbeat thread finds its job cancelled and says so: in its own thread, which starts with an empty
    logging context, with the job's id."""
    from core.jobs import claim_job
    from worker.runner.claim import Heartbeat

    job_id = create_job(session_factory, storage)
    with session_scope(session_factory) as session:
        assert claim_job(session, job_id, "w1")
        assert cancel_job(session, job_id)
    lost = threading.Event()

    def run():
        beat = Heartbeat(Job, job_id, "w1", session_factory, interval_s=0.05, on_lost=lost.set)
        beat.start()
        assert lost.wait(10)
        beat.stop()

    records = json_lines(run)
    [line] = [r for r in records if "is no longer run by" in r["message"]]
    assert line["logger"] == "worker.runner.claim" and line["job_id"] == job_id and line["level"] == "WARNING"


def test_every_line_of_an_export_carries_its_id_and_its_jobs(make_settings, session_factory, storage):
    job_id = create_job(session_factory, storage, status="succeeded", fine_tuned_model="ft:x")  # no adapter file: it fails
    export_id = ids.export_id()
    with session_scope(session_factory) as session:
        session.add(Export(id=export_id, job_id=job_id, status="queued", created_at=now()))
    outcome: list[str] = []
    records = json_lines(lambda: outcome.append(export_worker.run_export(export_id, make_settings(), session_factory, storage)))
    assert outcome == [export_worker.FAILED]
    assert any(r["message"].startswith(f"export {export_id} failed") for r in records)
    assert all(r.get("export_id") == export_id and r.get("job_id") == job_id for r in records), records


def test_a_celery_worker_logs_json_lines(tmp_path):
    """A real `celery worker` under QLORA_LOG_FORMAT=json: its log lines (stderr) are ours, not Celery's text format."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update(QLORA_HOME=str(tmp_path / "home"), QLORA_LOG_FORMAT="json", QLORA_TASK_QUEUE=f"logs-{os.getpid()}", PYTHONUNBUFFERED="1")
    err = tmp_path / "stderr"
    with err.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", env["QLORA_TASK_QUEUE"],
                                 "--concurrency", "1", "--loglevel", "INFO"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=out)
    try:
        wait_until(lambda: "ready." in err.read_text(), timeout_s=60, interval_s=0.2, message="the worker to be ready")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    time.sleep(0.1)
    records = [json.loads(line) for line in err.read_text().splitlines() if line.startswith("{")]
    assert any(r["logger"] == "celery.apps.worker" and r["message"].endswith("ready.") for r in records)
    # Anything else is what Python prints before logging is set up (the warning about running as root), never a log line.
    others = [line for line in err.read_text().splitlines() if not line.startswith("{")]
    assert not any("INFO/MainProcess" in line or "ready." in line for line in others), others
