"""The web dashboard at /ui: static HTML, JS and CSS (api/static/ui, docs/dashboard.md) served from the API's own
origin. The page holds no data and no secret of its own: it calls the public /v1 routes from the browser with
the API key the person signs in with, so a project sees what its key sees and nothing else."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

UI_DIR = Path(__file__).resolve().parent / "static" / "ui"


class DashboardFiles(StaticFiles):
    """StaticFiles whose JavaScript is always `text/javascript`, the type a browser requires of an ES module: the
    type guessed from the file name depends on the host's mime.types (application/javascript, or none at all)."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        if str(full_path).endswith(".js") and response.status_code != 304:
            response.headers["content-type"] = "text/javascript; charset=utf-8"
        return response


def mount_dashboard(app: FastAPI) -> None:
    """/ui/ answers index.html (/ui redirects there); the mount stays out of the OpenAPI document."""
    app.mount("/ui", DashboardFiles(directory=UI_DIR, html=True), name="ui")
