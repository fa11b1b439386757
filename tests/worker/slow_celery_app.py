"""The worker's Celery app with slow training steps, for tests that must hit a job mid-run in a real worker process.

A tiny model trains a step in milliseconds; each metrics write here first sleeps QLORA_TEST_STEP_DELAY_S (0.5 s by
default), so that a test can kill the worker between two checkpoints. Imported by `celery -A`, in the parent
before the pool forks, so every child trains slowly.

transformers (the Llama model) is imported here in the parent too, only to spare each child ~10 s of importing it
on a busy CI machine; it creates no CUDA context. bitsandbytes and peft stay child-only, as in production.
"""

from __future__ import annotations

import os
import time

import transformers.models.llama.modeling_llama  # noqa: F401

from worker.celery_app import app
from worker.sink import DatabaseSink

_metrics = DatabaseSink.metrics
_delay_s = float(os.environ.get("QLORA_TEST_STEP_DELAY_S", "0.5"))


def _slow_metrics(self, step, values):  # noqa: ANN001
    time.sleep(_delay_s)
    _metrics(self, step, values)


DatabaseSink.metrics = _slow_metrics  # type: ignore[method-assign]

__all__ = ["app"]
