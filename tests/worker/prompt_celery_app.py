"""A Celery app with the service's configuration and worker steps (core/queue.py, worker/celery_app.py) but a task of
its own that only records when it starts and ends: for timing how soon a freed worker starts its next task, without
importing the training code."""

from __future__ import annotations

import json
import os
import time

from core.queue import make_celery
from core.settings import get_settings
from worker.celery_app import PromptPool

app = make_celery(get_settings())
app.steps["consumer"].add(PromptPool)


@app.task(name="test.timed")
def timed(index: int, seconds: float) -> None:
    with open(os.environ["QLORA_TEST_TIMES"], "a") as out:
        out.write(json.dumps(["start", index, time.time()]) + "\n")
    time.sleep(seconds)
    with open(os.environ["QLORA_TEST_TIMES"], "a") as out:
        out.write(json.dumps(["end", index, time.time()]) + "\n")
