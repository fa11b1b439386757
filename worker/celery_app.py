"""The worker's Celery app: `celery -A worker.celery_app worker -B -Q qlora`.

Every setting and its reason lives in core/queue.py (the API builds the same app to send tasks by name);
this module only adds the task module the worker runs.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import bootsteps
from celery.signals import setup_logging

from core.logs import configure_logging
from core.queue import make_celery
from core.settings import get_settings

settings = get_settings()
# The embedded broker is a SQLite file under $QLORA_HOME: SQLite cannot create it in a missing directory, and the
# worker would restart its consumer in a loop until it gives up.
settings.home.mkdir(parents=True, exist_ok=True)

app = make_celery(settings)
app.conf.include = ["worker.tasks"]

# How often the worker's event loop looks for a free pool slot and replaces exited children, at the longest.
POOL_TICK_S = 0.1


class PromptPool(bootsteps.StartStopStep):
    """Start the next job within POOL_TICK_S of a worker freeing up, not seconds later.

    With a fresh child per job (core/queue.py), the prefork pool replaces the exited child on its 5 s maintenance
    timer whenever the exit is seen before the child can be reaped (the usual case), and the next message, already
    taken from the queue, waits for it. With the threads pool, a finished task frees its slot without waking the event
    loop, which looks for the next message only when it next wakes (up to 1 s). A repeating timer of POOL_TICK_S wakes
    the loop (which then takes the next message if a slot is free) and maintains the pool: a waitpid per child, no
    broker or database call."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any):
        self.timer: Any = None
        super().__init__(parent, **kwargs)

    def start(self, consumer: Any) -> None:
        if consumer.hub is not None:
            self.timer = consumer.hub.call_repeatedly(POOL_TICK_S, consumer.pool.maintain_pool)

    def stop(self, consumer: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


app.steps["consumer"].add(PromptPool)


@setup_logging.connect
def _configure_logging(loglevel: Any = None, **_: Any) -> None:
    """Celery leaves logging to a receiver of this signal: our handler, in QLORA_LOG_FORMAT, for the worker and its
    children. The stream is fixed now, before Celery redirects sys.stderr into the logs."""
    configure_logging(settings.log_format, level=loglevel or "INFO", stream=sys.stderr)
