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
