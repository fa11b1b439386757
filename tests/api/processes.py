"""The API as a real uvicorn process, for tests that need what only a process shows: its log lines, its answers
while a dependency hangs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO, free_port, wait_for_port


def api_env(**qlora: str) -> dict[str, str]:
    """This process's environment without its QLORA_* variables, plus `qlora` as QLORA_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update({f"QLORA_{name.upper()}": value for name, value in qlora.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def uvicorn_api(env: dict[str, str], log: Path) -> Iterator[str]:
    """`uvicorn --factory api.main:create_app` with `env`, stdout and stderr into `log`; yields its base URL."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        try:
            wait_for_port(port, timeout_s=60)
        except TimeoutError:
            raise AssertionError("the API did not start:\n" + log.read_text()) from None
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
