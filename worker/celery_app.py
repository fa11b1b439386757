"""The worker's Celery app: `celery -A worker.celery_app worker -B -Q qlora`.

Every setting and its reason lives in core/queue.py (the API builds the same app to send tasks by name);
this module only adds the task module the worker runs.
"""

from __future__ import annotations

from core.queue import make_celery
from core.settings import get_settings

settings = get_settings()
# The embedded broker is a SQLite file under $QLORA_HOME: SQLite cannot create it in a missing directory, and the
# worker would restart its consumer in a loop until it gives up.
settings.home.mkdir(parents=True, exist_ok=True)

app = make_celery(settings)
app.conf.include = ["worker.tasks"]
