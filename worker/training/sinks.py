"""Where the engine reports what happens: events, per-step metrics and checkpoints.

The engine only knows the `Sink` protocol. The service implements it to write events and metrics to the
database and checkpoints to object storage; here are the ones the engine needs alone: JSONL, a fan-out to
several sinks, and none (the CLI's progress bar is in cli.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Protocol

Level = Literal["info", "warn", "error"]

# The metric names of an OpenAI checkpoint object (`FineTuningJobCheckpoint.metrics`), in that order.
CHECKPOINT_METRIC_KEYS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")


class Sink(Protocol):
    def event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        """A human-readable event (job started, data stats, evaluation, ...)."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """The metrics of one optimizer step or evaluation (keys in docs/training.md)."""

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        """A verified adapter checkpoint was written to `path` (a directory in peft layout)."""


class NullSink:
    def event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        pass

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        pass


class JsonlSink:
    """Appends one JSON object a line: {"time", "kind": "event"|"metrics"|"checkpoint", ...}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        self._write({"kind": "event", "level": level, "message": message, "data": data})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._write({"kind": "metrics", "step": step, **values})

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self._write({"kind": "checkpoint", "step": step, "path": str(path), "metrics": metrics})


class MultiSink:
    def __init__(self, *sinks: Sink):
        self.sinks = sinks

    def event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        for sink in self.sinks:
            sink.event(level, message, data)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.metrics(step, values)

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.checkpoint(step, path, metrics)
