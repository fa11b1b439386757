"""/healthz and /readyz: no key needed; readiness names the dependency that fails."""

from fastapi.testclient import TestClient

from api.main import create_app
from tests.api.conftest import make_settings
from tests.conftest import free_port


def test_health_and_readiness_with_everything_up(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}


def test_readiness_names_an_unreachable_broker(tmp_path, database_url, queue_name, models_dir):
    settings = make_settings(tmp_path, database_url, f"redis://127.0.0.1:{free_port()}/0", queue_name, models_dir)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200  # alive, though not ready
        ready = client.get("/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["database"] == "ok" and checks["storage"] == "ok" and checks["broker"].startswith("error: ")


def test_prometheus_metrics_count_requests_by_route_and_read_jobs_and_the_queue(client):
    from tests.api.helpers import KEY_A, create_job, upload_ok

    file_id = upload_ok(client)["id"]
    create_job(client, file_id)
    client.get("/v1/files/file-nope", headers=KEY_A)
    client.get("/v1/files", headers={"Authorization": "Bearer wrong"})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'qlora_api_requests_total{method="POST",route="/v1/files",status="200"} 1.0' in text
    assert 'qlora_api_requests_total{method="GET",route="/v1/files/{file_id}",status="404"} 1.0' in text  # the template, not the id
    assert 'qlora_api_requests_total{method="GET",route="unrouted",status="401"} 1.0' in text  # refused by the guard, counted
    assert 'qlora_api_request_seconds_count{method="POST",route="/v1/fine_tuning/jobs"} 1.0' in text
    assert 'qlora_jobs{status="queued"} 1.0' in text
    assert "qlora_queue_depth 1.0" in text  # the job's message waits in this test's Redis queue


def test_readiness_answers_within_seconds_when_the_object_store_hangs(tmp_path, sqlite_url, redis_url, aws_test_credentials):
    """An S3 endpoint that accepts connections and never answers: /readyz says 503 in seconds, not after boto3's
    minute-long timeouts and retries."""
    import socket
    import time

    import httpx

    from tests.api.processes import api_env, uvicorn_api

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
        env = api_env(home=str(tmp_path / "home"), database_url=sqlite_url, broker_url=redis_url, storage="s3",
                      s3_endpoint=f"http://127.0.0.1:{hung.getsockname()[1]}", s3_bucket="hung", s3_region="us-east-1",
                      api_keys="sk-test")
        with uvicorn_api(env, tmp_path / "api.log") as url:
            started = time.monotonic()
            ready = httpx.get(f"{url}/readyz", timeout=30)
            elapsed = time.monotonic() - started
    assert ready.status_code == 503 and elapsed < 10, (ready.status_code, elapsed)
    checks = ready.json()["checks"]
    assert checks["storage"].startswith("error: ") and checks["database"] == "ok" and checks["broker"] == "ok"

