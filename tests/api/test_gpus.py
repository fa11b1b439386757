"""n_gpus at job creation: refused past QLORA_MAX_GPUS_PER_JOB, else queued on the queue of its GPU count."""

from __future__ import annotations

import redis
from fastapi.testclient import TestClient

from api.main import create_app
from core.queue import make_celery, queued_training_jobs, training_queue
from tests.api.helpers import assert_error, create_job, queued_tasks, upload_ok


def test_more_gpus_than_the_service_offers_is_a_400_naming_n_gpus(client):
    file_id = upload_ok(client)["id"]
    assert_error(create_job(client, file_id, hyperparameters={"n_gpus": 2}), 400, code="invalid_value", param="hyperparameters.n_gpus")
    assert_error(create_job(client, file_id, method={"type": "supervised", "supervised": {"hyperparameters": {"n_gpus": 0}}}), 400,
                 code="invalid_hyperparameter", param="method.supervised.hyperparameters.n_gpus")


def test_a_two_gpu_job_goes_to_the_two_gpu_queue(settings, redis_url):
    settings = settings.model_copy(update={"max_gpus_per_job": 2})
    queue = training_queue(settings, 2)
    try:
        with TestClient(create_app(settings)) as client:
            file_id = upload_ok(client)["id"]
            answer = create_job(client, file_id, hyperparameters={"n_gpus": 2})
            assert answer.status_code == 200, answer.text
            job_id = answer.json()["id"]
            assert answer.json()["hyperparameters"]["n_gpus"] == 2
            assert queued_tasks(redis_url, queue) == [("qlora.train", [job_id])]
            assert queued_tasks(redis_url, settings.task_queue) == []
            # the sweeper's lost-message check reads every GPU count's queue
            assert job_id in (queued_training_jobs(make_celery(settings), settings) or set())
    finally:
        client_redis = redis.Redis.from_url(redis_url)
        client_redis.delete(queue, f"_kombu.binding.{queue}")
        client_redis.close()


def test_one_gpu_jobs_keep_the_configured_queue(settings):
    assert training_queue(settings, 1) == settings.task_queue and training_queue(settings, 4) == f"{settings.task_queue}-4gpu"
