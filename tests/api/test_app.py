"""The app as a whole: auth, the error envelope and headers on every error, docs, and no torch in the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from core.tables import Project
from tests.api.helpers import KEY_A, KEY_B, MAX_UPLOAD, assert_error, db, upload

REPO = Path(__file__).resolve().parents[2]


def test_requests_without_a_valid_key_are_refused(client):
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic a2V5LWE6"},
        {"Authorization": "Bearer "},
        {"Authorization": "key-a"},
    ):
        for method, path in (
            ("GET", "/v1/files"),
            ("GET", "/v1/fine_tuning/jobs"),
            ("GET", "/v1/models"),
            ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel"),
            ("GET", "/v1/models/tiny-llama"),
        ):
            response = client.request(method, path, headers=headers)
            assert_error(response, 401, code="invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
    # An upload without a key is refused before its body counts: 401, not 413, and nothing spooled.
    big = upload(client, b"x" * (MAX_UPLOAD * 4), headers={"Authorization": "Bearer wrong"})
    assert_error(big, 401, code="invalid_api_key")
    assert not (client.app.state.settings.home / "tmp").exists()
    with db(client) as session:
        assert session.scalars(select(Project.name)).all() == []


def test_each_key_gets_its_project_row(client):
    assert client.get("/v1/files", headers=KEY_A).status_code == 200
    assert client.get("/v1/files", headers=KEY_A).status_code == 200  # the row exists: no second insert
    assert client.get("/v1/models", headers=KEY_B).status_code == 200
    with db(client) as session:
        assert sorted(session.scalars(select(Project.name))) == ["proj-a", "proj-b"]


def test_unknown_routes_and_methods(client):
    assert_error(client.get("/v1/nothing", headers=KEY_A), 404, code="unknown_url")
    assert_error(client.get("/", headers=KEY_A), 404, code="unknown_url")
    response = client.put("/v1/files", headers=KEY_A)
    assert_error(response, 405, code="method_not_allowed")
    assert response.headers["allow"]


def test_request_ids(client):
    ids = {client.get("/v1/files", headers=KEY_A).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith("req_") for i in ids)
    echoed = client.get("/v1/files", headers={**KEY_A, "x-request-id": "my-trace-42"})
    assert echoed.headers["x-request-id"] == "my-trace-42"
    assert "x-should-retry" not in echoed.headers
    odd = client.get("/v1/files", headers={**KEY_A, "x-request-id": "has spaces"})
    assert odd.headers["x-request-id"].startswith("req_")
    failed = client.get("/v1/nothing", headers={**KEY_A, "x-request-id": "trace-404"})
    assert failed.headers["x-request-id"] == "trace-404"


def test_unexpected_errors_are_500_envelopes(settings, caplog):
    app = create_app(settings)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    app.state.storage.iter_bytes = broken
    with TestClient(app, raise_server_exceptions=False) as client:
        file_id = client.post(
            "/v1/files", headers=KEY_A, data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", b"{}", "application/jsonl")}
        ).json()["id"]
        response = client.get(f"/v1/files/{file_id}/content", headers={**KEY_A, "x-request-id": "trace-500"})
    error = assert_error(response, 500, code="internal_error", type="server_error")
    assert "disk on fire" not in error["message"]  # internals stay in the log
    assert response.headers["x-request-id"] == "trace-500"
    assert "x-should-retry" not in response.headers  # a real server fault: the SDK may retry
    assert any("trace-500" in r.getMessage() and r.exc_info for r in caplog.records)


def test_docs_and_openapi(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{job_id}/checkpoints", "/v1/models"} <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_openapi_types_every_training_option(client):
    """Swagger lists every option of a job's hyperparameters, in both places they may be given, with its
    description and default."""
    from contract.options import TrainingConfig

    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    supervised = schemas["SupervisedMethod"]["properties"]["hyperparameters"]["anyOf"][0]
    deprecated = schemas["JobCreate"]["properties"]["hyperparameters"]["anyOf"][0]
    assert supervised == deprecated
    options = supervised["properties"]
    assert set(options) == set(TrainingConfig.model_fields) - {"seed", "method"} | {"learning_rate_multiplier"}  # method.type
    assert schemas["Method"]["properties"]["type"]["enum"] == ["supervised", "dpo"]  # what the dashboard offers
    assert all(option["description"] for option in options.values())
    # FastAPI leaves out a null default; every other default is shown.
    assert {name for name, option in options.items() if "default" not in option} == {
        name for name, field in TrainingConfig.model_fields.items() if field.default is None}
    assert options["lora_r"]["default"] == 16 and options["n_epochs"]["default"] == "auto"


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "QLORA_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)},
    )


def test_the_api_process_never_imports_torch(tmp_path):
    result = run_python(
        """
        import sys
        from fastapi.testclient import TestClient
        import api.main
        from core.settings import Settings
        app = api.main.create_app(Settings(api_keys="k=p"))
        with TestClient(app) as client:
            assert client.get("/openapi.json").status_code == 200
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "bitsandbytes"))
        assert not heavy, heavy
        print("no torch")
    """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no torch"


def test_importing_the_module_builds_nothing_until_app_is_used(tmp_path):
    result = run_python(
        """
        import os
        import api.main
        assert "app" not in vars(api.main)
        assert not os.path.exists(os.environ["QLORA_HOME"])
        from uvicorn.importer import import_from_string
        app = import_from_string("api.main:app")
        assert app is api.main.app and type(app).__name__ == "FastAPI"
        assert app.state.settings.home == __import__("pathlib").Path(os.environ["QLORA_HOME"]).resolve()
        print("lazy")
    """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lazy"
