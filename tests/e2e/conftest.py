"""The running service shared by the tests that drive it from outside (the `qlora` command line): one embedded-mode
process (`python -m launch.embedded`) for the whole session, on a tiny random Llama, with two projects' keys."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import free_port, make_tiny_llama
from tests.e2e.test_openai_sdk import MODEL, base_env, start

# A base model whose weights file is corrupt: a job on it fails when the worker loads it, a real failure that
# costs no training.
BROKEN_MODEL = "broken-llama"


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory, tokenizer):
    home = tmp_path_factory.mktemp("embedded") / "home"
    make_tiny_llama(home / "models" / MODEL, tokenizer)
    broken = make_tiny_llama(home / "models" / BROKEN_MODEL, tokenizer)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    port = free_port()
    service = start([[sys.executable, "-m", "launch.embedded", "--no-demo-model", "--port", str(port)]], base_env(home), home, port)
    yield service
    service.stop()
