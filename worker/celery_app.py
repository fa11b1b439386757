"""The worker's Celery app: `celery -A worker.celery_app worker -B -Q qlora`.

Every setting and its reason lives in core/queue.py (the API builds the same app to send tasks by name);
this module only adds the task module the worker runs.
"""

from __future__ import annotations

import sys
from typing import Any

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


@setup_logging.connect
def _configure_logging(loglevel: Any = None, **_: Any) -> None:
    """Celery leaves logging to a receiver of this signal: our handler, in QLORA_LOG_FORMAT, for the worker and its
    children. The stream is fixed now, before Celery redirects sys.stderr into the logs."""
    configure_logging(settings.log_format, level=loglevel or "INFO", stream=sys.stderr)
