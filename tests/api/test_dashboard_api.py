"""What the dashboard needs from the API itself: its static files at /ui (no key: the page holds no data), and
the jobs list's `status` filter. The dashboard in a browser: tests/e2e/test_dashboard.py."""

from __future__ import annotations

import re

import pytest

from api.ui import UI_DIR
from tests.api.helpers import KEY_A, KEY_B, assert_error, create_job_ok, upload_ok


def test_the_dashboard_is_served_at_ui_without_a_key(client):
    redirect = client.get("/ui", follow_redirects=False)
    assert redirect.status_code in (301, 307) and redirect.headers["location"].endswith("/ui/")
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Every file the page names is served (the vendored chart library included), so it works offline.
    for asset in re.findall(r'(?:src|href)="([^"#:]+)"', page.text):
        served = client.get(f"/ui/{asset}")
        assert served.status_code == 200 and served.content, asset
    assert "uPlot" in client.get("/ui/vendor/uplot-1.6.32/uPlot.iife.min.js").text
    assert "/ui" not in str(client.get("/openapi.json").json()["paths"])  # not part of the API's document
    assert client.get("/ui/nope.js").status_code == 404


def test_the_dashboards_modules_are_served_as_javascript_and_load_as_modules(client, monkeypatch):
    """Each ES module is served as text/javascript (a browser refuses a module of another type), whatever type the
    host's mime.types gives .js; the page runs no inline script or handler, so a `script-src 'self'` CSP allows it."""
    import starlette.responses

    monkeypatch.setattr(starlette.responses, "guess_type", lambda name, *args, **kwargs: ("application/octet-stream", None))
    page = client.get("/ui/").text
    assert re.search(r'<script type="module" src="app.js"></script>', page)
    assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", page), "an inline script"
    assert not re.search(r"\son[a-z]+=", page), "an inline event handler"
    modules = sorted(path.relative_to(UI_DIR).as_posix() for path in UI_DIR.rglob("*.js") if "vendor" not in path.parts)
    assert {"app.js", "api.js", "dom.js", "router.js", "pages/job.js", "pages/jobs.js"} <= set(modules)
    for module in modules:
        served = client.get(f"/ui/{module}")
        assert served.status_code == 200 and served.headers["content-type"] == "text/javascript; charset=utf-8", module
        # Every relative import names a file that is served too.
        for imported in re.findall(r'^import .* from "(\.[^"]+)";$', served.text, flags=re.M):
            target = (UI_DIR / module).parent.joinpath(imported).resolve().relative_to(UI_DIR).as_posix()
            assert target in modules, (module, imported)


@pytest.mark.parametrize("path", ["/ui/app.css", "/ui/"])
def test_the_dashboards_other_files_keep_their_types(client, path):
    assert not client.get(path).headers["content-type"].startswith("text/javascript")


def test_list_jobs_filtered_by_status(client):
    training_file = upload_ok(client)["id"]
    first, second, third = (create_job_ok(client, training_file)["id"] for _ in range(3))
    create_job_ok(client, upload_ok(client, headers=KEY_B)["id"], headers=KEY_B)  # another project's queued job
    for job_id in (first, third):
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=KEY_A).status_code == 200

    def listed(**params):
        return [j["id"] for j in client.get("/v1/fine_tuning/jobs", headers=KEY_A, params=params).json()["data"]]

    assert listed(status="cancelled") == [third, first]
    assert listed(status="queued") == [second]
    assert listed(status="succeeded") == []
    page = client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"status": "cancelled", "limit": 1}).json()
    assert [j["id"] for j in page["data"]] == [third] and page["has_more"] is True
    assert listed(status="cancelled", after=third) == [first]
    assert_error(client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"status": "done"}), 400, code="invalid_value", param="status")
