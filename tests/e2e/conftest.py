"""Fixtures shared by the end-to-end tests that drive a running service from outside (the dashboard in a browser)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import free_port
from tests.e2e.test_openai_sdk import base_env, start

DEMO = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory, demo_model_dir):
    """One embedded service (`python -m launch.embedded`: API, worker, inference server) for the whole session, with
    the demo model under its models directory and the keys KEY_A (project team-a) and KEY_B (team-b). Tests that
    share it create their own files and jobs and must not expect a project to be empty of another test's jobs."""
    home = tmp_path_factory.mktemp("embedded") / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / DEMO).symlink_to(demo_model_dir)
    port = free_port()
    service = start([[sys.executable, "-m", "launch.embedded", "--no-demo-model", "--port", str(port)]], base_env(home), home, port)
    yield service
    service.stop()
