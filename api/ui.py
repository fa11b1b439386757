"""The pages a browser opens on the API's origin, and the headers that hold them in.

- /ui: the web dashboard, static HTML, JS and CSS (api/static/ui, docs/dashboard.md). The page holds no data and
  no secret of its own: it calls the public /v1 routes from the browser with the API key the person signs in with
  (kept in the tab's sessionStorage), so a project sees what its key sees and nothing else.
- /docs: Swagger UI for /openapi.json, its files from the `fastapi-offline` package (pinned in pyproject.toml)
  and our own page (api/static/docs): nothing is loaded from a CDN.

Every answer gets `SECURITY_HEADERS`, and a Content-Security-Policy: the dashboard's and Swagger UI's allow
scripts, styles and requests from this origin only, so a script injected into either page (or another origin
that frames it) cannot run or read the key; everything else (JSON, files) allows nothing at all.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).resolve().parent / "static"
UI_DIR = STATIC / "ui"
DOCS_DIR = STATIC / "docs"
SWAGGER_UI_DIR = Path(str(files("fastapi_offline") / "static"))

_PAGE = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; font-src 'self'; "
         "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Swagger UI sets style attributes in the markup it renders; styles cannot run code, scripts stay 'self' only.
CSP = {
    "/ui": _PAGE + "; style-src 'self'",
    "/docs": _PAGE + "; style-src 'self' 'unsafe-inline'",
}
CSP_OTHER = "default-src 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY"}


class DashboardFiles(StaticFiles):
    """StaticFiles whose JavaScript is always `text/javascript`, the type a browser requires of an ES module: the
    type guessed from the file name depends on the host's mime.types (application/javascript, or none at all)."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        if str(full_path).endswith(".js") and response.status_code != 304:
            response.headers["content-type"] = "text/javascript; charset=utf-8"
        return response


def mount_pages(app: FastAPI) -> None:
    """/ui/ answers the dashboard's index.html (/ui redirects there), /docs/ Swagger UI (/docs redirects there);
    the mounts stay out of the OpenAPI document."""
    app.mount("/ui", DashboardFiles(directory=UI_DIR, html=True), name="ui")
    app.mount("/docs/swagger-ui", DashboardFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")  # before /docs: matched first
    app.mount("/docs", DashboardFiles(directory=DOCS_DIR, html=True), name="docs")


def csp_for(path: str) -> str:
    for prefix, policy in CSP.items():
        if path == prefix or path.startswith(prefix + "/"):
            return policy
    return CSP_OTHER


class SecurityHeaders:
    """Adds the headers above to every HTTP answer (errors included), unless a route set its own."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = csp_for(scope["path"])

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in {**SECURITY_HEADERS, "content-security-policy": policy}.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)
