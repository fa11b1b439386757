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

from contract.metrics import StepMetrics

Level = Literal["info", "warn", "error"]


class Sink(Protocol):
    def start(self, total_steps: int) -> None:
        """Training begins (the model is loaded): the job will run `total_steps` optimizer steps in all."""

    def event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        """A human-readable event (job started, data stats, evaluation, ...)."""

    def metrics(self, step: int, values: StepMetrics) -> None:
        """The metrics of one optimizer step (and its evaluation, if it ran one)."""

    def checkpoint(self, step: int, path: Path, metrics: StepMetrics) -> None:
        """A verified adapter checkpoint was written to `path` (a directory in peft layout) after the step of `metrics`."""


class NullSink:
    def start(self, total_steps: int) -> None:
        pass

    def event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        pass

    def metrics(self, step: int, values: StepMetrics) -> None:
        pass

    def checkpoint(self, step: int, path: Path, metrics: StepMetrics) -> None:
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

    def start(self, total_steps: int) -> None:
        self._write({"kind": "start", "total_steps": total_steps})

    def event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        self._write({"kind": "event", "level": level, "message": message, "data": data})

    def metrics(self, step: int, values: StepMetrics) -> None:
        self._write({"kind": "metrics", **values.to_dict()})

    def checkpoint(self, step: int, path: Path, metrics: StepMetrics) -> None:
        self._write({"kind": "checkpoint", "step": step, "path": str(path), "metrics": metrics.checkpoint_metrics()})


class MultiSink:
    def __init__(self, *sinks: Sink):
        self.sinks = sinks

    def start(self, total_steps: int) -> None:
        for sink in self.sinks:
            sink.start(total_steps)

    def event(self, level: Level, message: str, data: dict[str, Any] | None = None) -> None:
        for sink in self.sinks:
            sink.event(level, message, data)

    def metrics(self, step: int, values: StepMetrics) -> None:
        for sink in self.sinks:
            sink.metrics(step, values)

    def checkpoint(self, step: int, path: Path, metrics: StepMetrics) -> None:
        for sink in self.sinks:
            sink.checkpoint(step, path, metrics)
