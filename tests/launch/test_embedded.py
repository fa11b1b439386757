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
