"""The running service shared by the tests that drive it from outside (the `qlora` command line, the dashboard in a
browser): one embedded-mode process (`python -m launch.embedded`: API, worker, inference server) for the session."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import free_port, make_tiny_llama
from tests.e2e.test_openai_sdk import MODEL, base_env, start

DEMO = "SmolLM2-135M-Instruct"
# A base model whose weights file is corrupt: a job on it fails when the worker loads it, a real failure that
# costs no training.
BROKEN_MODEL = "broken-llama"


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory, tokenizer, demo_model_dir):
    """The service with three base models (a tiny random Llama, a broken one, the demo model) and the keys KEY_A
    (project team-a) and KEY_B (team-b). Tests that share it create their own files and jobs and must not expect a
    project to be empty of another test's jobs."""
    home = tmp_path_factory.mktemp("embedded") / "home"
    make_tiny_llama(home / "models" / MODEL, tokenizer)
    broken = make_tiny_llama(home / "models" / BROKEN_MODEL, tokenizer)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    (home / "models" / DEMO).symlink_to(demo_model_dir)
    port = free_port()
    service = start([[sys.executable, "-m", "launch.embedded", "--no-demo-model", "--port", str(port), "--inference-port", str(free_port())]], base_env(home), home, port)
    yield service
    service.stop()
