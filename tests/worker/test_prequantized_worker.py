"""A job on a GPTQ base through the real service: the API (in process, SQLite, kombu's SQLAlchemy transport as the
broker) decides the job's quantization from the base's config.json, and a real Celery worker process trains it."""

from __future__ import annotations

import secrets
import time

from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from tests.api.helpers import API_KEYS, KEY_A, assert_error, chat_jsonl, upload_ok
from tests.worker.test_celery_worker import celery_worker

MODEL = "tiny-llama-gptq"


def test_a_job_on_a_gptq_base_trains_through_the_api_and_a_celery_worker(gptq_model_dir, sqlite_url, tmp_path, monkeypatch):
    # The worker decides compute_dtype 'auto' before the engine runs: without native bf16 (oneDNN held to AVX2, as on
    # most CPUs) that would be fp32 for a float base; a GPTQ base must get bf16.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    models = tmp_path / "models"
    models.mkdir()
    (models / MODEL).symlink_to(gptq_model_dir)
    settings = Settings(home=tmp_path / "home", database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
                        storage="local", storage_dir=tmp_path / "objects", models_dir=models, api_keys=API_KEYS,
                        task_queue=f"qlora-test-{secrets.token_hex(4)}", heartbeat_interval_s=0.5, heartbeat_timeout_s=30,
                        sweep_interval_s=5)
    with TestClient(create_app(settings)) as client, celery_worker(settings, "worker.celery_app", tmp_path / "worker.log") as proc:
        training_file = upload_ok(client, chat_jsonl(12))["id"]
        refused = client.post("/v1/fine_tuning/jobs", headers=KEY_A, json={
            "model": MODEL, "training_file": training_file, "hyperparameters": {"quantization": "4bit"}})
        assert_error(refused, 400, code="invalid_hyperparameter", param="hyperparameters.quantization")

        created = client.post("/v1/fine_tuning/jobs", headers=KEY_A, json={
            "model": MODEL, "training_file": training_file, "hyperparameters": {"max_steps": 1, "batch_size": 4}})
        assert created.status_code == 200, created.text
        job = created.json()
        assert job["hyperparameters"]["quantization"] == "gptq"

        deadline = time.monotonic() + 180
        while (job := client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=KEY_A).json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "worker.log").read_text()[-5000:]
            time.sleep(0.5)
        assert job["status"] == "succeeded", (job["error"], (tmp_path / "worker.log").read_text()[-5000:])
        assert job["fine_tuned_model"] and job["trained_tokens"] > 0
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=KEY_A, params={"limit": 100}).json()["data"]
        assert any(e["message"].startswith("Model loaded") and "quantization=gptq, compute_dtype=bf16" in e["message"] for e in events)
