"""A job on several GPUs: the runner launches `torchrun --standalone --nproc_per_node N` and records what rank 0 reports.

The runner keeps what it does for a one-GPU job (the claim, the heartbeat, the database sink, the final commit); only
the training moves into torchrun's processes (worker/training/distributed.py). They talk back over a Unix socket in
the job's work directory (worker/training/report.py): rank 0's events, metrics, checkpoints and result go to the
`DatabaseSink` here, so each is written once; the answer to every message carries the runner's stop (cancelled,
taken over, past QLORA_MAX_JOB_SECONDS) and pause, which the ranks agree on at the end of a step.

How a launch ends:
- rank 0 reports a result: the run's result (succeeded, or stopped at a step);
- a rank reports an error that is the job's (its data, its options, a non-finite loss, a bad checkpoint): that error,
  as a one-GPU run fails with it;
- otherwise (a rank killed, an exception that is not the job's, a lost connection between ranks): `LaunchCrashed`, which
  the runner handles as the sweeper handles a dead worker (requeued from the newest checkpoint while attempts are
  left, else failed), at once rather than after the heartbeat timeout.
torchrun runs as the leader of a session of its own; every rank dies with it (its parent-death signal), and it dies
with the runner (its own parent-death signal), so ending torchrun ends the whole launch, and no rank outlives it.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.metrics import StepMetrics
from worker.runner.inputs import JobFailure
from worker.training.report import REPORT_SOCKET_ENV
from worker.training.sinks import Sink
from worker.training.trainer import TrainingRequest, TrainingResult

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # where the `worker` package the ranks import lives
# After a stop is asked, how long the ranks get to reach the end of their step before the launch is ended by force.
STOP_GRACE_S = 300.0
# How long torchrun gets to end its ranks after SIGTERM before it is killed (its ranks then die with it).
TERMINATE_GRACE_S = 30.0


class LaunchCrashed(RuntimeError):
    """The launch ended without a result and without an error of the job's own: a rank died or failed outside the
    job's control. `steps`: the last step rank 0 reported."""

    def __init__(self, message: str, steps: int):
        super().__init__(message)
        self.steps = steps


def torchrun_command(n_gpus: int, job_file: Path, resume_from: Path | None) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_gpus),
               "-m", "worker.training.distributed", str(job_file)]
    return command + (["--resume", str(resume_from)] if resume_from is not None else [])


def _die_with_runner() -> None:  # in the forked child, before exec: torchrun gets SIGTERM when the runner dies
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def train_on_gpus(request: TrainingRequest, n_gpus: int, sink: Sink, workdir: Path, *, should_stop: Callable[[], bool],
                  should_pause: Callable[[], bool], resume_from: Path | None = None,
                  record_resolved: Callable[[dict[str, Any]], None] | None = None) -> TrainingResult:
    """Train `request` on `n_gpus` processes under torchrun, reporting to `sink`; returns rank 0's result. Raises
    JobFailure for an error of the job's own, LaunchCrashed when the launch ended otherwise."""
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps({
        "base_model": str(request.base_model_dir), "train_file": str(request.train_file), "output_dir": str(request.output_dir),
        "validation_file": str(request.validation_file) if request.validation_file else None,
        "hyperparameters": request.config.resolved()}))
    socket_path = workdir / "ranks.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    server.listen(64)
    env = {**os.environ, REPORT_SOCKET_ENV: str(socket_path),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    log_path = workdir / "torchrun.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(torchrun_command(n_gpus, job_file, resume_from), env=env, cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_runner if sys.platform.startswith("linux") else None)
    log.info("launched torchrun (pid %d) on %d processes", proc.pid, n_gpus)
    session = _Session(sink, should_stop, should_pause, record_resolved)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    stop_seen: float | None = None
    try:
        while True:
            ended = proc.poll() is not None
            ready = selector.select(timeout=0 if ended else 0.5)
            for key, _ in ready:
                if key.fileobj is server:
                    conn, _ = server.accept()
                    selector.register(conn, selectors.EVENT_READ, conn.makefile("rwb"))
                else:
                    if not session.serve(key.data):
                        selector.unregister(key.fileobj)
                        key.data.close()
                        key.fileobj.close()
            if ended and not ready:
                break
            if stop_seen is None and session.stopping():
                stop_seen = time.monotonic()
            if stop_seen is not None and time.monotonic() - stop_seen > STOP_GRACE_S and proc.poll() is None:
                log.warning("the ranks did not stop within %.0f s of the stop: ending the launch", STOP_GRACE_S)
                end_launch(proc)
    finally:
        end_launch(proc)
        for key in list(selector.get_map().values()):
            if key.data is not None:
                key.data.close()
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
        socket_path.unlink(missing_ok=True)
    return session.outcome(proc.returncode, log_path)


def end_launch(proc: subprocess.Popen) -> None:
    """End a torchrun launch that still runs: SIGTERM to its session (torchrun ends its ranks), SIGKILL if it lingers
    (its ranks then die with it)."""
    for sig, wait_s in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


class _Session:
    """What the ranks said during one launch, and the answers given to them."""

    def __init__(self, sink: Sink, should_stop: Callable[[], bool], should_pause: Callable[[], bool],
                 record_resolved: Callable[[dict[str, Any]], None] | None):
        self.sink, self.should_stop, self.should_pause, self.record_resolved = sink, should_stop, should_pause, record_resolved
        self.result: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        self.last_step = self.total_steps = 0
        self._stop = False

    def stopping(self) -> bool:
        self._stop = self._stop or self.should_stop()
        return self._stop

    def serve(self, stream: Any) -> bool:
        """Handle one message from a rank and answer it; False when the rank closed its end."""
        try:
            line = stream.readline()
        except OSError:
            return False
        if not line:
            return False
        message = json.loads(line)
        self.handle(message)
        answer = {"stop": self.stopping(), "pause": message.get("kind") == "poll" and not self._stop and self.should_pause()}
        try:
            stream.write(json.dumps(answer).encode() + b"\n")
            stream.flush()
        except OSError:
            return False
        return True

    def handle(self, message: dict[str, Any]) -> None:
        kind = message["kind"]
        if kind == "start":
            self.total_steps = int(message["total_steps"])
            self.sink.start(self.total_steps)
        elif kind == "event":
            self.sink.event(message["level"], message["message"], message.get("data"))
        elif kind == "metrics":
            self.last_step = int(message["step"])
            self.sink.metrics(self.last_step, StepMetrics(**message["values"]))
        elif kind == "checkpoint":
            self.sink.checkpoint(int(message["step"]), Path(message["path"]), StepMetrics(**message["metrics"]))
        elif kind == "resolved" and self.record_resolved is not None:
            self.record_resolved(dict(message["options"]))
        elif kind == "result":
            self.result = message["result"]
        elif kind == "error":
            log.warning("rank %s failed: %s", message.get("rank"), message.get("message"))
            self.errors.append(message)

    def outcome(self, returncode: int | None, log_path: Path) -> TrainingResult:
        if self.result is not None:
            result = dict(self.result)
            return TrainingResult(**{**result, "adapter_dir": Path(result["adapter_dir"]) if result["adapter_dir"] else None,
                                     "checkpoints": [Path(p) for p in result["checkpoints"]]})
        own = [e for e in self.errors if e.get("error") != "crash"]
        if own:
            raise _job_failure(own[0])
        if self.stopping():  # stopped before rank 0 could report (ended by force): nothing to record
            return TrainingResult("stopped", self.last_step, self.total_steps, 0, None, None, None, [], {}, None, 0.0)
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        log.warning("torchrun exited with %s without a result; its output ends with:\n%s", returncode, tail)
        why = self.errors[0]["message"] if self.errors else f"torchrun exited with status {returncode}: a training process died"
        raise LaunchCrashed(f"rank {self.errors[0].get('rank')} failed: {why}" if self.errors else why, self.last_step)


def _job_failure(error: dict[str, Any]) -> JobFailure:
    """The job's own error, as a one-GPU run of the runner reports it."""
    kind, message = error.get("error"), str(error.get("message"))
    if kind == "data":
        role = error.get("role") or "training"
        return JobFailure(f"invalid_{role}_file", message, f"{role}_file")
    if kind == "config":
        return JobFailure(error.get("code") or "invalid_hyperparameter", message, error.get("param"))
    if kind == "non_finite":
        return JobFailure("non_finite_loss", f"Training stopped: {message}")
    return JobFailure("checkpoint_error", f"Cannot resume from the checkpoint: {message}")
