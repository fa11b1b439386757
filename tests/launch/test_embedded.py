"""The embedded launcher's own steps (the processes it starts are exercised by tests/e2e)."""

from __future__ import annotations

import sqlite3

from core.queue import control_queue
from core.settings import Settings
from launch.embedded import declare_queues


def test_the_broker_queues_exist_before_any_process_starts(tmp_path):
    """Kombu's SQLAlchemy transport inserts a queue's row on first use; the API's first send and the worker's first
    consume racing to insert it stopped the worker once (UNIQUE constraint). The launcher makes the rows first."""
    settings = Settings(home=tmp_path, api_keys="sk-test")
    queues = (settings.task_queue, control_queue(settings))
    for _ in range(2):  # and again, as each `make run` does on the same broker file
        declare_queues(settings, *queues)
        with sqlite3.connect(tmp_path / "broker.db") as db:
            assert sorted(name for (name,) in db.execute("SELECT name FROM kombu_queue")) == sorted(queues)


def test_a_port_in_use_is_named_before_anything_starts(tmp_path):
    """Another `make run` holds the API's port, or the inference server's: the launcher says which and how to choose
    another, exits 2, and has started and written nothing (no database under QLORA_HOME)."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | {"QLORA_HOME": str(tmp_path / "home")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for ports, words in (((busy, free_port()), f"port {busy} on 127.0.0.1, for the API, is in use"),
                             ((free_port(), busy), f"port {busy} on 127.0.0.1, for the inference server, is in use")):
            run = subprocess.run([sys.executable, "-m", "launch.embedded", "--no-demo-model", "--port", str(ports[0]),
                                  "--inference-port", str(ports[1])], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
            assert run.returncode == 2 and words in run.stderr, run.stderr
    assert not (tmp_path / "home" / "qlora.db").exists()
