"""Jobs on several GPUs launched by the worker: `torchrun --standalone --nproc_per_node 2` as a child process group of
the runner, on gloo (2 CPU processes), over the tiny random Llama. Rank 0 reports to the runner, which writes."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from core.db import make_engine, make_session_factory, session_scope
from core.queue import control_queue, training_queue
from core.settings import Settings
from core.tables import JobEvent, JobMetric
from tests.api.helpers import chat_jsonl
from tests.worker.helpers import MODEL, checkpoints, create_job, events, get_job, stored_config, wait_until
from tests.worker.test_celery_worker import celery_worker, make_worker_settings, wait_for_status
from worker import runner

pytestmark = pytest.mark.slow

TWO_GPUS = dict(n_gpus=2, max_steps=4, batch_size=3, micro_batch_size=1, checkpoint_every=2, compute_dtype="fp32")


@pytest.fixture
def pg_factory(postgres_url):
    """PostgreSQL only: each launch costs tens of seconds, and the runner's database code is the one-GPU path's."""
    engine = make_engine(postgres_url)
    yield make_session_factory(engine)
    engine.dispose()


def gpu_settings(tmp_path, postgres_url, models_dir, **overrides) -> Settings:
    values = dict(home=tmp_path / "home", database_url=postgres_url, broker_url="memory://", storage="local",
                  storage_dir=tmp_path / "objects", models_dir=models_dir, worker_gpus=2)
    return Settings(**{**values, **overrides})


def rank_processes(parent: psutil.Process) -> list[psutil.Process]:
    """The training ranks under `parent` (torchrun's children, which hold RANK in their environment)."""
    found = []
    for proc in parent.children(recursive=True):
        try:
            if "RANK" in proc.environ():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_two_gpu_job_runs_through_the_api_and_a_celery_worker_and_writes_once(postgres_url, redis_url, models_dir, tmp_path):
    import redis

    settings = make_worker_settings(tmp_path, models_dir, postgres_url, redis_url).model_copy(
        update={"api_keys": "key-a=proj-a", "max_gpus_per_job": 2, "worker_gpus": 2})
    queue = training_queue(settings, 2)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    log_path = tmp_path / "worker.log"
    headers = {"Authorization": "Bearer key-a"}
    try:
        with TestClient(create_app(settings)) as client:
            file_id = client.post("/v1/files", headers=headers, files={"file": ("train.jsonl", chat_jsonl(10))},
                                  data={"purpose": "fine-tune"}).json()["id"]
            body = {"model": MODEL, "training_file": file_id, "method": {"type": "supervised", "supervised": {"hyperparameters": TWO_GPUS}}}
            too_many = client.post("/v1/fine_tuning/jobs", headers=headers, json={**body, "method": {
                "type": "supervised", "supervised": {"hyperparameters": {**TWO_GPUS, "n_gpus": 3}}}})
            assert too_many.status_code == 400
            assert too_many.json()["error"]["param"] == "method.supervised.hyperparameters.n_gpus"
            created = client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
            assert created.status_code == 200, created.text
            job_id = created.json()["id"]
            assert created.json()["method"]["supervised"]["hyperparameters"]["n_gpus"] == 2
        with celery_worker(settings, "worker.celery_app", log_path, queues=f"{queue},{control_queue(settings)}") as proc:
            assert wait_for_status(factory, job_id, proc, log_path, timeout_s=240) == "succeeded", get_job(factory, job_id).error
        job = get_job(factory, job_id)
        assert job.fine_tuned_model and len(job.result_files) == 2 and job.trained_tokens
        with session_scope(factory) as session:
            steps = list(session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)))
            metric_events = session.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.type == "metrics").limit(1))
        assert steps == [1, 2, 3, 4]
        messages = [e.message for e in events(factory, job_id)]
        assert sum(m.startswith("Step ") and "training loss" in m for m in messages) == 4 and metric_events  # once each
        assert [c.step for c in checkpoints(factory, job_id)] == [2, 4]  # written once, by rank 0
        assert sum(m.startswith("Data parallel over 2 processes") for m in messages) == 1
        assert sum(m.startswith("Model loaded") for m in messages) == 1
        assert "launched torchrun" in log_path.read_text()
    finally:
        client_redis = redis.Redis.from_url(redis_url)
        client_redis.delete(queue, f"_kombu.binding.{queue}", settings.task_queue, f"_kombu.binding.{settings.task_queue}")
        client_redis.close()
        engine.dispose()


def test_a_killed_rank_ends_the_launch_and_the_job_resumes_from_its_checkpoint(tmp_path, postgres_url, pg_factory, storage, models_dir):
    session_factory = pg_factory
    settings = gpu_settings(tmp_path, postgres_url, models_dir, heartbeat_interval_s=0.5)
    job_id = create_job(session_factory, storage, hyper=stored_config(**{**TWO_GPUS, "max_steps": 100000, "checkpoint_every": 1}))
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("value", runner.run_job(job_id, settings, session_factory, storage)))
    worker.start()
    wait_until(lambda: checkpoints(session_factory, job_id), timeout_s=180, interval_s=0.1, message="a checkpoint")
    ranks = rank_processes(psutil.Process())
    assert sorted(p.environ()["RANK"] for p in ranks) == ["0", "1"]
    killed_at = time.monotonic()
    next(p for p in ranks if p.environ()["RANK"] == "1").kill()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the run did not end within 60 s of the kill"
    ended_in = time.monotonic() - killed_at
    assert outcome["value"] == runner.STOPPED
    job = get_job(session_factory, job_id)
    assert job.status == "queued" and job.resume_checkpoint is not None and job.enqueued_at is None and job.worker_id is None
    assert any(e.message.startswith("A training process crashed") for e in events(session_factory, job_id))
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "a rank outlived the launch"
    print(f"run ended {ended_in:.1f} s after rank 1 was killed")


# make test-bench: the engine-level stop across ranks is in tests/training/test_distributed.py (make test's time).
@pytest.mark.bench
def test_a_cancel_stops_both_ranks_at_one_step(tmp_path, postgres_url, pg_factory, storage, models_dir):
    from core.jobs import cancel_job

    session_factory = pg_factory
    settings = gpu_settings(tmp_path, postgres_url, models_dir, heartbeat_interval_s=0.2)
    job_id = create_job(session_factory, storage, hyper=stored_config(**{**TWO_GPUS, "max_steps": 100000, "checkpoint_every": None}))
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("value", runner.run_job(job_id, settings, session_factory, storage)))
    worker.start()
    wait_until(lambda: len(events(session_factory, job_id)) and any(e.type == "metrics" for e in events(session_factory, job_id)),
               timeout_s=180, interval_s=0.1, message="a step")
    ranks = rank_processes(psutil.Process())
    with session_scope(session_factory) as session:
        assert cancel_job(session, job_id)
    worker.join(timeout=60)
    assert not worker.is_alive() and outcome["value"] == runner.STOPPED
    assert get_job(session_factory, job_id).status == "cancelled"
    assert ranks and not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
