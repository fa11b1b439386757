"""The web dashboard at /ui: static HTML, JS and CSS (api/static/ui, docs/dashboard.md) served from the API's own
origin. The page holds no data and no secret of its own: it calls the public /v1 routes from the browser with
the API key the person signs in with, so a project sees what its key sees and nothing else."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent / "static" / "ui"


def mount_dashboard(app: FastAPI) -> None:
    """/ui/ answers index.html (/ui redirects there); the mount stays out of the OpenAPI document."""
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
