"""The line from a torchrun launch back to the process that started it (the worker's runner), when there is one.

The runner (worker/runner/gpus.py) listens on a Unix socket and names it in QLORA_REPORT_SOCKET. Rank 0 sends what
the single-process engine hands its `Sink` (start, events, metrics, checkpoints), the options it decided for its
device and the result; any rank sends the error it fails with. Every message is one JSON line, and the runner answers
each with one line, {"stop": bool, "pause": bool}: whether the job must stop (cancelled, taken over, past its time
limit) or pause. So a message returns only once the runner has written it (a checkpoint once it is uploaded: rank 0
may then delete older ones), and rank 0 learns of a stop or pause at the next step, which the ranks then agree on
(parallel.DataParallel.agreed_stop). The runner going away (its socket closed) is an error of the rank that talks
to it: the launch then ends, and no rank trains for a job nobody records.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from contract.metrics import StepMetrics

REPORT_SOCKET_ENV = "QLORA_REPORT_SOCKET"


class RunnerGone(ConnectionError):
    """The runner's end of the socket closed: nobody records this run any more."""


class RunnerLink:
    """One rank's connection to the runner: `ask` sends a message and returns the runner's answer."""

    def __init__(self, path: str | Path, rank: int):
        self.rank = rank
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(str(path))
        self._file = self._socket.makefile("rwb")
        self.stop = self.pause = False

    @classmethod
    def from_env(cls, rank: int) -> RunnerLink | None:
        path = os.environ.get(REPORT_SOCKET_ENV)
        return cls(path, rank) if path else None

    def ask(self, kind: str, **fields: Any) -> dict[str, Any]:
        try:
            self._file.write(json.dumps({"kind": kind, "rank": self.rank, **fields}, allow_nan=False).encode() + b"\n")
            self._file.flush()
            line = self._file.readline()
        except OSError as exc:
            raise RunnerGone(f"the runner that launched this run is gone ({exc})") from None
        if not line:
            raise RunnerGone("the runner that launched this run is gone (its socket closed)")
        answer = json.loads(line)
        self.stop, self.pause = bool(answer.get("stop")), bool(answer.get("pause"))
        return answer

    def stop_requested(self) -> bool:
        return bool(self.ask("poll")["stop"])

    def pause_requested(self) -> bool:
        return bool(self.ask("poll")["pause"])

    def close(self) -> None:
        for closable in (self._file, self._socket):
            try:
                closable.close()
            except OSError:
                pass


def _jsonable(data: Any) -> Any:
    """`data` with NaN and infinities as None: strict JSON on the wire, as the database sink would store them."""
    if isinstance(data, float):
        return data if data == data and data not in (float("inf"), float("-inf")) else None
    if isinstance(data, dict):
        return {str(k): _jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_jsonable(v) for v in data]
    if data is None or isinstance(data, (str, int, bool)):
        return data
    return data.item() if hasattr(data, "item") else str(data)


class RunnerSink:
    """Rank 0's `Sink`: everything goes to the runner, which writes it to the database and object storage."""

    def __init__(self, link: RunnerLink):
        self.link = link

    def start(self, total_steps: int) -> None:
        self.link.ask("start", total_steps=total_steps)

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.link.ask("event", level=level, message=message, data=_jsonable(data))

    def metrics(self, step: int, values: StepMetrics) -> None:
        self.link.ask("metrics", step=step, values=_jsonable(values.to_dict()))

    def checkpoint(self, step: int, path: Path, metrics: StepMetrics) -> None:
        self.link.ask("checkpoint", step=step, path=str(Path(path).resolve()), metrics=_jsonable(metrics.to_dict()))
