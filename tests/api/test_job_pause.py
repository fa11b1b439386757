"""POST /v1/fine_tuning/jobs/{id}/pause and /resume over HTTP and through the SDK (whose status Literal lacks
`paused`: in its default mode it returns the string as it is). The worker's half (checkpoint, exact resume) is in
tests/worker/test_pause.py."""

from __future__ import annotations

import os
import subprocess
import sys

import openai
from sqlalchemy import select, update

from core.jobs import claim_job, succeed_job
from core.tables import Job
from tests.api.helpers import KEY_A, KEY_B, MODEL, assert_error, chat_jsonl, create_job_ok, db, queued_tasks, upload_ok
from tests.api.processes import api_env, uvicorn_api
from tests.conftest import REPO


def test_pausing_a_queued_job_takes_it_out_of_the_queue(client, settings, redis_url):
    file_id = upload_ok(client)["id"]
    first = create_job_ok(client, file_id)["id"]
    second = create_job_ok(client, file_id)["id"]
    assert [args for _, args in queued_tasks(redis_url, settings.task_queue)] == [[first]]  # one message per project

    sdk = openai.OpenAI(api_key="key-a", base_url="http://testserver/v1", http_client=client, max_retries=0)
    paused = sdk.fine_tuning.jobs.pause(first)
    assert paused.status == "paused"
    # Its turn passed to the project's next job; a message for the paused one finds it not queued.
    assert sorted(args for _, args in queued_tasks(redis_url, settings.task_queue)) == sorted([[first], [second]])
    with db(client) as session:
        assert not claim_job(session, first, "worker-1")
    assert_error(client.post(f"/v1/fine_tuning/jobs/{first}/pause", headers=KEY_A), 400, code="invalid_job_status", param="job_id")
    assert_error(client.post(f"/v1/fine_tuning/jobs/{first}/resume", headers=KEY_B), 404, code="job_not_found", param="job_id")

    resumed = sdk.fine_tuning.jobs.resume(first)
    assert resumed.status == "queued"
    assert_error(client.post(f"/v1/fine_tuning/jobs/{first}/resume", headers=KEY_A), 400, code="invalid_job_status", param="job_id")
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(first)]
    assert "Job paused" in messages and "Job resumed" in messages

    sdk.fine_tuning.jobs.pause(first)
    assert sdk.fine_tuning.jobs.cancel(first).status == "cancelled"  # cancel works on a paused job
    assert_error(client.post(f"/v1/fine_tuning/jobs/{first}/resume", headers=KEY_A), 400, code="invalid_job_status", param="job_id")
    assert_error(client.post(f"/v1/fine_tuning/jobs/{first}/pause", headers=KEY_A), 400, code="invalid_job_status", param="job_id")


def test_pausing_a_running_job_asks_its_worker(client):
    job_id = create_job_ok(client, upload_ok(client)["id"])["id"]
    with db(client) as session:
        assert claim_job(session, job_id, "worker-1")
    answer = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=KEY_A)
    assert answer.status_code == 200 and answer.json()["status"] == "running"  # until the worker has its checkpoint
    with db(client) as session:
        assert session.scalar(select(Job.pause_requested_at).where(Job.id == job_id)) is not None
        assert succeed_job(session, job_id, "worker-1", fine_tuned_model="ft:x", trained_tokens=1, result_files=[])
        session.execute(update(Job).where(Job.id == job_id).values(pause_requested_at=None))
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=KEY_A), 400, code="invalid_job_status", param="job_id")


def test_qlora_jobs_pause_and_resume(tmp_path, postgres_url, redis_url, queue_name, models_dir):
    """The CLI's `qlora jobs pause` / `resume` against a real API process."""
    env = api_env(home=str(tmp_path / "home"), database_url=postgres_url, broker_url=redis_url, task_queue=queue_name,
                  api_keys="key-a=proj-a", models_dir=str(models_dir))
    with uvicorn_api(env, tmp_path / "api.log") as url:
        sdk = openai.OpenAI(api_key="key-a", base_url=f"{url}/v1", max_retries=0)
        job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=sdk.files.create(file=chat_jsonl(), purpose="fine-tune").id)

        def qlora(*args: str) -> list[str]:
            clean = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "OPENAI_"))}
            clean.update({"QLORA_BASE_URL": f"{url}/v1", "QLORA_API_KEY": "key-a"})
            done = subprocess.run([sys.executable, "-m", "cli", *args], env=clean, cwd=REPO, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout.split()

        assert qlora("jobs", "pause", job.id) == [job.id, "paused"]
        assert qlora("jobs", "resume", job.id) == [job.id, "queued"]
