"""A worker that frees up starts its next queued task at once (worker.celery_app.PromptPool): under prefork with a fresh
child per job, and under the threads pool."""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time

import pytest

from core.queue import make_celery
from core.settings import Settings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def queue_name(redis_url: str):
    """A queue of this test's own, removed afterwards with kombu's binding key."""
    import redis

    name = f"qlora-prompt-test-{secrets.token_hex(6)}"
    yield name
    redis.Redis.from_url(redis_url).delete(name, f"_kombu.binding.{name}")


@pytest.mark.parametrize(("pool", "bound_s"), [("prefork", 2.0), ("threads", 0.3)])
def test_a_freed_worker_starts_the_next_task_promptly(tmp_path, redis_url, queue_name, pool, bound_s):
    """Four queued tasks on a one-slot worker: the median gap from one's end to the next one's start is the time a free
    GPU would sit idle between jobs (without PromptPool: about 5 s under prefork, the pool's maintenance timer, and up
    to 1 s under threads, the event loop's idle poll)."""
    times = tmp_path / "times.jsonl"
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", broker_url=redis_url,
                        task_queue=queue_name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update({"QLORA_HOME": str(settings.home), "QLORA_DATABASE_URL": settings.database_url, "QLORA_BROKER_URL": redis_url,
                "QLORA_TASK_QUEUE": queue_name, "QLORA_TEST_TIMES": str(times), "PYTHONPATH": REPO})
    app = make_celery(settings)
    for index in range(4):
        app.send_task("test.timed", args=[index, 0.2], queue=queue_name)
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.worker.prompt_celery_app", "worker", "-Q", queue_name,
                             "--pool", pool, "--concurrency", "1", "--without-mingle", "--without-gossip", "--without-heartbeat",
                             "--loglevel", "WARNING"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        rows: list[list] = []
        while time.monotonic() < deadline:
            rows = [json.loads(line) for line in times.read_text().splitlines()] if times.exists() else []
            if sum(1 for kind, _, _ in rows if kind == "end") == 4:
                break
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.1)
        else:
            raise AssertionError(f"not 4 tasks in 60 s: {rows}\n{(tmp_path / 'worker.log').read_text()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    at = {(kind, index): t for kind, index, t in rows}
    gaps = [at[("start", i + 1)] - at[("end", i)] for i in range(3)]
    assert statistics.median(gaps) < bound_s, gaps
