"""Where the engine reports what happens: events, per-step metrics and checkpoints.

The engine only knows the `Sink` protocol. The service implements it to write events and metrics to the
database and checkpoints to object storage; here are the ones the engine needs alone: JSONL, stdout, and
a fan-out to several sinks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any, Literal, Protocol

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


class StdoutSink:
    """Plain lines for a terminal or a log file."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stdout

    def event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        print(f"[{level}] {message}", file=self.stream, flush=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, (int, float)) and k != "step")
        print(f"step {step}: {shown}", file=self.stream, flush=True)

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        print(f"checkpoint step {step}: {path}", file=self.stream, flush=True)


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
