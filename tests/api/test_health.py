"""/healthz and /readyz: no key needed; readiness names the dependency that fails. Prometheus metrics on their own
port (QLORA_METRICS_PORT), never the API's."""

import random
import string

import httpx
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.api.conftest import make_settings
from tests.conftest import free_port


@pytest.fixture
def settings(tmp_path, database_url, redis_url, queue_name, models_dir):
    return make_settings(tmp_path, database_url, redis_url, queue_name, models_dir, metrics_port=free_port())


def scrape(client) -> str:
    """GET /metrics from the app's metrics listener, as Prometheus does."""
    response = httpx.get(f"http://127.0.0.1:{client.app.state.settings.metrics_port}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain"), response.text
    return response.text


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
    text = scrape(client)
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


def test_readiness_answers_within_seconds_when_the_database_hangs(tmp_path, postgres_url, redis_url, queue_name, models_dir):
    """PostgreSQL behind a proxy that freezes: connections stay open and nothing comes back. /readyz says 503 in
    seconds (libpq alone would wait forever), a second call does not pile up another stuck check, and once the
    server answers again so does /readyz."""
    import time

    from tests.faults import TcpProxy

    port = int(postgres_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    via_proxy = postgres_url.replace(f":{port}/", f":{proxy.port}/")
    try:
        with TestClient(create_app(make_settings(tmp_path, via_proxy, redis_url, queue_name, models_dir))) as client:
            assert client.get("/readyz").json()["checks"]["database"] == "ok"
            proxy.freeze()
            for _ in range(2):
                started = time.monotonic()
                ready = client.get("/readyz")
                assert ready.status_code == 503 and time.monotonic() - started < 10
                checks = ready.json()["checks"]
                assert checks["database"].startswith("error: ") and checks["broker"] == "ok", checks
            proxy.thaw()
            assert client.get("/readyz").status_code == 200
    finally:
        proxy.close()


def test_metrics_show_each_running_jobs_progress_and_the_sweepers_actions(client, settings):
    """What the workers and the sweeper write to the database, read at scrape time: a real sink's steps, a real sweep."""
    import time

    from sqlalchemy import delete, update

    from contract.metrics import StepMetrics
    from core.db import session_scope
    from core.jobs import claim_job
    from core.tables import Job, JobEvent
    from tests.api.helpers import create_job_ok, upload_ok
    from worker.database_sink import DatabaseSink
    from worker.sweeper import sweep

    state = client.app.state
    file_id = upload_ok(client)["id"]
    running, lost, preference = (create_job_ok(client, file_id)["id"] for _ in range(3))
    with session_scope(state.session_factory) as session:
        assert claim_job(session, running, "gpu-a:4242:task-1") and claim_job(session, lost, "gpu-b:77:task-2")
        assert claim_job(session, preference, "gpu-c:9:task-3")
        session.execute(update(Job).where(Job.id == lost).values(heartbeat_at=time.time() - 3600))  # its worker died
    sink = DatabaseSink(running, "gpu-a:4242:task-1", state.session_factory, state.storage, on_lost=lambda: None)
    sink.start(total_steps=10)
    for step, seconds in ((1, 0.5), (2, 0.25)):
        sink.metrics(step, StepMetrics(step=step, train_loss=2.0 / step, tokens=100, tokens_per_second=100 / seconds,
                                       step_seconds=seconds, peak_memory_bytes=3 << 30))
    # A dpo job's step: its reward accuracy and margin get gauges of their own (the row's method does not matter).
    dpo_sink = DatabaseSink(preference, "gpu-c:9:task-3", state.session_factory, state.storage, on_lost=lambda: None)
    dpo_sink.start(total_steps=4)
    dpo_sink.metrics(1, StepMetrics(step=1, train_loss=0.69, train_rewards_accuracies=0.75, train_rewards_margins=0.125))

    with session_scope(state.session_factory) as session:  # the numbers come from job_metrics and the job row, not events
        session.execute(delete(JobEvent).where(JobEvent.job_id.in_([running, preference])))
    text = scrape(client)
    labels = f'job_id="{running}",worker="gpu-a:4242"'
    assert f"qlora_job_step{{{labels}}} 2.0" in text
    assert f"qlora_job_total_steps{{{labels}}} 10.0" in text
    assert f"qlora_job_step_seconds{{{labels}}} 0.25" in text
    assert f"qlora_job_tokens_per_second{{{labels}}} 400.0" in text
    assert f"qlora_job_peak_memory_bytes{{{labels}}} 3.221225472e+09" in text  # 3 GiB
    assert f'job_id="{lost}"' not in text, "no step written yet: no samples"
    dpo_labels = f'job_id="{preference}",worker="gpu-c:9"'
    assert f"qlora_job_reward_accuracy{{{dpo_labels}}} 0.75" in text and f"qlora_job_reward_margin{{{dpo_labels}}} 0.125" in text
    assert f"qlora_job_reward_accuracy{{{labels}}}" not in text, "a supervised step has no reward: no sample"
    assert 'qlora_sweeper_actions_total{action="failed"} 0.0' in text and "qlora_sweeper_last_sweep_timestamp_seconds" not in text

    assert sweep(settings, state.session_factory, state.celery)["failed"] == [lost]
    text = scrape(client)
    assert 'qlora_sweeper_actions_total{action="sweeps"} 1.0' in text
    assert 'qlora_sweeper_actions_total{action="failed"} 1.0' in text
    assert 'qlora_sweeper_actions_total{action="requeued"} 0.0' in text and 'qlora_sweeper_actions_total{action="resent"} 0.0' in text
    [last] = [line for line in text.splitlines() if line.startswith("qlora_sweeper_last_sweep_timestamp_seconds ")]
    assert abs(float(last.split()[1]) - time.time()) < 60
    assert 'qlora_jobs{status="failed"} 1.0' in text and 'qlora_jobs{status="running"} 2.0' in text


def test_metrics_are_served_on_their_own_port_only(client, settings, tmp_path, database_url, redis_url, queue_name, models_dir):
    """They name running jobs, workers and every project's counts: not on the API's port, with or without a key."""
    from tests.api.helpers import KEY_A

    assert "qlora_api_requests_total" in scrape(client)
    assert client.get("/metrics").status_code == 404 and client.get("/metrics", headers=KEY_A).status_code == 404
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    # A port already taken: the API does not start (without its metrics, unnoticed).
    with pytest.raises(OSError):
        with TestClient(create_app(make_settings(tmp_path / "b", database_url, redis_url, queue_name, models_dir,
                                                 metrics_port=settings.metrics_port))):
            pass


def test_callers_cannot_add_label_values(client):
    """Methods and paths are the caller's choice: the series stay those of a fixed set of methods and the app's own
    route templates, however many different ones are sent."""
    from api.metrics import METHODS, route_templates
    from tests.api.helpers import KEY_A

    rng = random.Random(0)
    for i in range(60):
        method = "".join(rng.choices(string.ascii_uppercase, k=12))
        path = rng.choice(["/v1/files", f"/v1/files/file-{i}", f"/ui/{i}.js", f"/nowhere/{i}", "/healthz"])
        assert client.request(method, path, headers=KEY_A).status_code < 500
    client.request("get", "/healthz")  # methods are case-sensitive: this one is not GET either
    templates = {template for _, template in route_templates(client.app)} | {"unrouted"}
    series = [line for line in scrape(client).splitlines() if line.startswith("qlora_api_requests_total{")]
    methods = {line.split('method="')[1].split('"')[0] for line in series}
    routes = {line.split('route="')[1].split('"')[0] for line in series}
    assert methods <= METHODS | {"other"} and "other" in methods, methods
    assert routes <= templates and "/ui/{path}" in routes, routes
    assert len(series) < 30, series


def test_a_scrape_reads_all_running_jobs_in_one_query(client):
    """GET /metrics costs the same few SQL statements with 20 running jobs as with one (no query per running job), and
    each job's sample is its newest step."""
    import time

    from sqlalchemy import event, insert, select

    from core.db import session_scope
    from core.tables import Job, JobMetric
    from tests.api.helpers import create_job_ok, upload_ok

    state = client.app.state
    template = create_job_ok(client, upload_ok(client)["id"])["id"]
    with session_scope(state.session_factory) as session:
        row = dict(session.execute(select(Job.__table__).where(Job.id == template)).mappings().one())
        del row["seq"]

    def run_jobs(first: int, count: int) -> None:
        ids = [f"ftjob-scrape{i:03d}" for i in range(first, first + count)]
        with session_scope(state.session_factory) as session:
            session.execute(insert(Job.__table__), [{**row, "id": job_id, "status": "running", "worker_id": f"gpu-{job_id[-3:]}:7:task",
                                                     "total_steps": 50, "heartbeat_at": time.time()} for job_id in ids])
            session.execute(insert(JobMetric.__table__), [
                {"job_id": job_id, "step": step, "created_at": 0.0, "values": {"step_seconds": 0.5, "tokens_per_second": 10.0 * step}}
                for job_id in ids for step in (1, 2, 3)])

    engine = state.session_factory.kw["bind"]
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(statement)

    def scrape_counted() -> tuple[str, int]:
        statements.clear()
        event.listen(engine, "before_cursor_execute", count)
        try:
            text = scrape(client)
        finally:
            event.remove(engine, "before_cursor_execute", count)
        return text, len(statements)

    run_jobs(0, 1)
    _, with_one = scrape_counted()
    run_jobs(1, 19)
    text, with_twenty = scrape_counted()
    assert with_twenty == with_one <= 3, statements
    samples = [line for line in text.splitlines() if line.startswith("qlora_job_step{")]
    assert len(samples) == 20 and all(line.endswith(" 3.0") for line in samples), samples
    assert 'qlora_job_tokens_per_second{job_id="ftjob-scrape007",worker="gpu-007:7"} 30.0' in text
    assert 'qlora_jobs{status="running"} 20.0' in text
