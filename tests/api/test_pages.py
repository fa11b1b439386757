"""The pages a browser opens on the API's origin (/ui, /docs): their security headers, and in a real headless
Chromium (Debian's `chromium`, driven by Playwright) that they work under their Content-Security-Policy, load
nothing from another origin, and cannot be framed."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.api.processes import api_env, uvicorn_api

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "sk-pages"


def test_every_answer_has_the_security_headers(client):
    for path in ("/ui/", "/ui/app.js", "/docs/", "/docs/init.js", "/docs/swagger-ui/swagger-ui-bundle.js", "/v1/files", "/openapi.json"):
        response = client.get(path)
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "no-referrer" and response.headers["x-frame-options"] == "DENY", path
        policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'", (path, policy)
        if path.startswith(("/ui", "/docs")):
            assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'", (path, policy)
    assert client.get("/docs").url.path == "/docs/" and "swagger-ui/swagger-ui-bundle.js" in client.get("/docs/").text
    assert client.get("/redoc").status_code == 404  # it came from a CDN too; /docs is the one documented


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A real API process with one key (SQLite, local storage, an in-memory broker: the pages need no job)."""
    root = tmp_path_factory.mktemp("pages")
    env = api_env(home=str(root / "home"), database_url=f"sqlite:///{root / 'qlora.db'}", broker_url="memory://", storage="local",
                  api_keys=KEY)
    import subprocess
    import sys

    from tests.conftest import REPO

    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], env=env, cwd=REPO, check=True, capture_output=True, timeout=120)
    with uvicorn_api(env, root / "api.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium executable on PATH (Debian: apt-get install --no-install-recommends chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


def open_page(browser, service: str):
    """A page that records CSP violations, JavaScript errors and every request to another origin."""
    context = browser.new_context(base_url=service)
    page = context.new_page()
    page.problems = []
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" and "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("request", lambda r: page.problems.append(f"request to {r.url}")
            if not r.url.startswith((service, "data:", "blob:")) else None)
    return context, page


@pytest.mark.timeout(120)
def test_swagger_ui_works_from_the_apis_own_files_under_its_policy(browser, service):
    context, page = open_page(browser, service)
    try:
        page.goto("/docs")
        page.locator(".opblock-summary-path", has_text="/v1/fine_tuning/jobs").first.wait_for(timeout=30_000)
        assert page.locator(".opblock").count() > 10
        page.locator(".opblock-summary", has_text="/v1/files").first.click()  # expand one: rendered by the bundle's script
        page.locator(".opblock-body").first.wait_for(timeout=10_000)
        assert not page.problems, page.problems
    finally:
        context.close()


@pytest.mark.timeout(120)
def test_the_dashboard_signs_in_under_its_policy_and_cannot_be_framed(browser, service):
    context, page = open_page(browser, service)
    try:
        page.goto("/ui/#/signin")
        page.get_by_label("API key").fill(KEY)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("heading", name="Fine-tuning jobs").wait_for(timeout=30_000)
        page.get_by_role("navigation").get_by_role("link", name="New job").click()  # a view built from /openapi.json
        page.get_by_label("Base model").wait_for(timeout=30_000)
        assert not page.problems, page.problems
        # Another origin framing the dashboard gets nothing: frame-ancestors 'none' (and X-Frame-Options).
        page.set_content(f'<iframe id="f" src="{service}/ui/"></iframe>')
        page.wait_for_timeout(1000)
        framed = page.frame_locator("#f").locator("#main")
        assert framed.count() == 0
    finally:
        context.close()
    assert httpx.get(f"{service}/ui/", timeout=10).headers["content-security-policy"]
