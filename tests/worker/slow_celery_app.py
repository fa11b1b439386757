"""The worker's Celery app with slow training steps, for tests that must hit a job mid-run in a real worker process.

A tiny model trains a step in milliseconds; each metrics write here first sleeps 0.5 s, so that a test can kill the
worker between two checkpoints. Imported by `celery -A`, in the parent
before the pool forks, so every child trains slowly.

On a machine without a GPU, transformers (the Llama model) is imported here in the parent too, only to spare each
child ~10 s of importing it on a busy CI machine. With a GPU it stays child-only, as in production (nothing that
might touch CUDA may run in the parent before the fork).
"""

from __future__ import annotations

import importlib
import shutil
import time

from worker.celery_app import app
from worker.database_sink import DatabaseSink

_metrics = DatabaseSink.metrics
_delay_s = 0.5


def _slow_metrics(self, step, values):  # noqa: ANN001
    time.sleep(_delay_s)
    _metrics(self, step, values)


DatabaseSink.metrics = _slow_metrics  # type: ignore[method-assign]

if shutil.which("nvidia-smi") is None:
    importlib.import_module("transformers.models.llama.modeling_llama")

__all__ = ["app"]
