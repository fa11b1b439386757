"""200 job creations at once against a real API process (uvicorn) on PostgreSQL and Redis: 200 rows, 200 task
messages, none lost or duplicated; then 200 cancels at once, all cancelled. And creations racing past a project's
active-jobs limit, and uploads racing past its stored-bytes limit: exactly the limit is created."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from core.db import make_engine, make_session_factory, session_scope
from core.tables import Job
from tests.api.helpers import API_KEYS, KEY_A, MODEL, chat_jsonl, queued_tasks
from tests.conftest import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
N_JOBS = 200


@pytest.fixture
def max_active_jobs() -> int:
    return 2 * N_JOBS


@pytest.fixture
def max_stored_bytes() -> int:
    return 1 << 30


@pytest.fixture
def messages_per_project() -> int:
    """Room in the broker for every job at once (fair dispatch sends all), unless a test says otherwise."""
    return 2 * N_JOBS


@pytest.fixture
def api_process(tmp_path, postgres_url, redis_url, queue_name, models_dir, max_active_jobs, max_stored_bytes, messages_per_project):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update({"QLORA_HOME": str(tmp_path / "home"), "QLORA_DATABASE_URL": postgres_url, "QLORA_BROKER_URL": redis_url,
                "QLORA_TASK_QUEUE": queue_name, "QLORA_API_KEYS": API_KEYS, "QLORA_MODELS_DIR": str(models_dir),
                "QLORA_STORAGE": "local", "QLORA_MAX_ACTIVE_JOBS_PER_PROJECT": str(max_active_jobs),
                "QLORA_MAX_STORED_BYTES_PER_PROJECT": str(max_stored_bytes),
                "QLORA_QUEUED_MESSAGES_PER_PROJECT": str(messages_per_project), "QLORA_MAX_RUNNING_JOBS_PER_PROJECT": str(messages_per_project),
                "QLORA_MAX_QUEUED_JOBS_PER_PROJECT": str(max_active_jobs)})
    log = tmp_path / "api.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout_s=60)
        yield f"http://127.0.0.1:{port}"
    except BaseException:
        print(log.read_text()[-10000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def training_file(client: httpx.Client) -> str:
    uploaded = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", chat_jsonl(), "application/jsonl")})
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    deadline = time.monotonic() + 30
    while client.get(f"/v1/files/{file_id}").json()["status"] != "processed":
        assert time.monotonic() < deadline, "the file was not processed"
        time.sleep(0.1)
    return file_id


def create_at_once(client: httpx.Client, file_id: str, n: int) -> list[httpx.Response]:
    def create(i: int) -> httpx.Response:
        return client.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": file_id, "suffix": f"c{i}",
                                                          "hyperparameters": {"n_epochs": 1}})

    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(create, range(n)))


@pytest.mark.timeout(120)
def test_200_concurrent_creations_make_200_rows_and_200_messages_then_200_cancels(api_process, postgres_url, redis_url, queue_name):
    with httpx.Client(base_url=api_process, headers=KEY_A, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        file_id = training_file(client)
        created = create_at_once(client, file_id, N_JOBS)
        assert [r.status_code for r in created] == [200] * N_JOBS, next(r.text for r in created if r.status_code != 200)
        ids = [r.json()["id"] for r in created]
        assert len(set(ids)) == N_JOBS

        engine = make_engine(postgres_url)
        factory = make_session_factory(engine)
        with session_scope(factory) as session:
            rows = dict(session.execute(select(Job.id, Job.enqueued_at)).all())
        assert set(rows) == set(ids) and all(rows.values())  # every row, each marked as sent
        messages = Counter(args[0] for task, args in queued_tasks(redis_url, queue_name) if task == "qlora.train")
        assert set(messages) == set(ids) and set(messages.values()) == {1}  # one message a job: none lost, none twice

        with ThreadPoolExecutor(max_workers=32) as pool:
            cancelled = list(pool.map(lambda job_id: client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"), ids))
        assert [(r.status_code, r.json()["status"]) for r in cancelled] == [(200, "cancelled")] * N_JOBS
        with session_scope(factory) as session:
            statuses = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        assert statuses == {"cancelled": N_JOBS}
        engine.dispose()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("messages_per_project", [1])
def test_concurrent_creations_put_one_message_of_the_project_in_the_broker(api_process, postgres_url, redis_url, queue_name):
    """Fair dispatch under concurrency: 50 creations at once, each dispatching under the project's row lock, send
    exactly one message; the other 49 jobs wait unsent in the database."""
    with httpx.Client(base_url=api_process, headers=KEY_A, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        created = create_at_once(client, training_file(client), 50)
    assert [r.status_code for r in created] == [200] * 50
    messages = [args[0] for task, args in queued_tasks(redis_url, queue_name) if task == "qlora.train"]
    engine = make_engine(postgres_url)
    with session_scope(make_session_factory(engine)) as session:
        sent = set(session.scalars(select(Job.id).where(Job.enqueued_at.is_not(None))))
    engine.dispose()
    assert len(messages) == 1 and set(messages) == sent


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_active_jobs", [20])
def test_concurrent_creations_never_pass_the_active_jobs_limit(api_process, postgres_url, redis_url, queue_name, max_active_jobs):
    """Counting a project's active jobs and adding one must not interleave between requests: 60 creations at once
    against a limit of 20 make exactly 20 jobs (and messages); the other 40 get 429 quota_exceeded."""
    with httpx.Client(base_url=api_process, headers=KEY_A, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        created = create_at_once(client, training_file(client), 3 * max_active_jobs)
    codes = Counter(r.status_code for r in created)
    assert codes == {200: max_active_jobs, 429: 2 * max_active_jobs}, codes
    assert {r.json()["error"]["code"] for r in created if r.status_code == 429} == {"quota_exceeded"}
    engine = make_engine(postgres_url)
    with session_scope(make_session_factory(engine)) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == max_active_jobs
    engine.dispose()
    assert len(queued_tasks(redis_url, queue_name)) == max_active_jobs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_stored_bytes", [10 * len(chat_jsonl())])
def test_concurrent_uploads_never_pass_the_stored_bytes_limit(api_process, tmp_path, max_stored_bytes):
    """30 uploads at once against room for 10: exactly 10 stored (rows and objects), 20 refused with 429."""
    def upload(i: int) -> httpx.Response:
        return client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (f"t{i}.jsonl", chat_jsonl(), "application/jsonl")})

    with httpx.Client(base_url=api_process, headers=KEY_A, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        with ThreadPoolExecutor(max_workers=30) as pool:
            uploads = list(pool.map(upload, range(30)))
        codes = Counter(r.status_code for r in uploads)
        assert codes == {200: 10, 429: 20}, codes
        listed = client.get("/v1/files", params={"limit": 100}).json()["data"]
    assert len(listed) == 10 and sum(f["bytes"] for f in listed) <= max_stored_bytes
    objects = [p for p in (tmp_path / "home" / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 10  # a refused upload's object was deleted
