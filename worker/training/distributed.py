"""Run one training job on several processes (one per GPU), launched by torchrun:

    torchrun --standalone --nproc_per_node 2 -m worker.training.distributed job.yaml [--output DIR] [--resume CKPT]

The job file and options are the engine CLI's (worker/training/cli.py). Every process builds the same model
(same seed, so the same LoRA init) and trains on its share of each step's global batch: `batch_size` is the
batch of the whole step, split across the processes, and the loss is divided by the target count of the whole
step, so the losses and gradients equal one process training the whole batch (worker/training/parallel.py).
Rank 0 alone reports (a progress bar and OUTPUT/metrics.jsonl) and writes checkpoints, the adapter and
result.json, in the single-process layout: a job resumes on any number of processes.
Backend: NCCL with CUDA (process i on cuda:LOCAL_RANK), gloo on the CPU. SIGUSR1 to any rank stops all of them
after the same step (torchrun itself ends its processes on SIGINT/SIGTERM, without a clean stop). Exit status as
the CLI's: 0 succeeded, 2 invalid options or data (every rank finds the fault before any collective call), 130
stopped.

Launched by the service's worker (worker/runner/gpus.py), QLORA_REPORT_SOCKET names the runner's socket: rank 0
reports there instead of printing (worker/training/report.py), takes the runner's stop and pause, which all ranks
then agree on at a step's end, and every rank reports the error it fails with. Each rank dies with its torchrun
(Linux's parent-death signal): torchrun starts ranks in sessions of their own, so without it a killed torchrun would
leave them training as orphans.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import torch
import torch.distributed as dist


def init_process_group() -> None:
    """Join torchrun's process group: NCCL on this rank's GPU, gloo without CUDA."""
    if not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= os.environ.keys():
        raise SystemExit("error: run under torchrun (RANK, WORLD_SIZE and LOCAL_RANK are not set)")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def die_with_launcher() -> None:
    """Ask Linux to kill this process when its parent (torchrun) dies; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the call above: nobody would end this rank
        raise SystemExit("error: the launcher of this rank is gone")


def main(argv: list[str] | None = None) -> int:
    from worker.training.cli import parse_args

    args = parse_args(argv, prog="python -m worker.training.distributed", description=__doc__)
    if "LOCAL_RANK" in os.environ:
        die_with_launcher()
    init_process_group()
    try:
        return _run(args)
    finally:
        dist.destroy_process_group()


def _run(args: Any) -> int:
    from contract.data_format import DataValidationError
    from contract.options import ConfigError
    from worker.training.checkpoint import CheckpointError
    from worker.training.cli import ProgressSink, read_job
    from worker.training.parallel import DataParallel
    from worker.training.report import REPORT_SOCKET_ENV, RunnerLink, RunnerSink
    from worker.training.sinks import JsonlSink, MultiSink, NullSink, Sink
    from worker.training.trainer import NonFiniteLossError, train

    replicas = DataParallel()
    main_rank = replicas.is_main
    served = REPORT_SOCKET_ENV in os.environ  # launched by the service's runner: report to it
    link = RunnerLink.from_env(replicas.rank) if served and main_rank else None

    def fail(message: str, kind: str, **fields: Any) -> int:
        report_error(kind, message=message, **fields)
        if main_rank and not served:
            print(f"error: {message}", file=sys.stderr)
        return 2

    def report_error(kind: str, **fields: Any) -> None:
        """Tell the runner why this rank fails (each rank that fails does; the runner keeps the first)."""
        nonlocal link
        if not served:
            return
        try:
            link = link or RunnerLink.from_env(replicas.rank)
            if link is not None:
                link.ask("error", error=kind, **fields)
        except (OSError, ValueError):
            pass  # the runner is gone: it learns of the failure from torchrun's exit

    try:
        job = read_job(args)
    except (ValueError, OSError) as exc:
        return fail(str(exc), "config")
    stop_requested = False

    def request_stop(signum: int, frame: Any) -> None:  # SIGUSR1 to any rank: all stop after the same step
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGUSR1, request_stop)
    progress = ProgressSink() if main_rank and not served else None
    sink: Sink = NullSink()
    if link is not None:
        sink = RunnerSink(link)
    elif progress is not None:
        sink = MultiSink(progress, JsonlSink(job.output_dir / "metrics.jsonl"))
    should_pause = None
    if served:  # the runner's pause, asked by rank 0 after each step, agreed on by all
        should_pause = replicas.agreed_stop(lambda: link is not None and link.pause_requested())
    try:
        pids: list[Any] = [None] * replicas.world_size
        dist.all_gather_object(pids, {"pid": os.getpid(), "host": os.uname().nodename})
        if main_rank:
            if link is not None and job.config.compute_dtype == "auto":
                # Decided by a rank on its own GPU, recorded by the runner: a resumed run keeps the same dtype.
                from worker.training.model import pick_device, resolve_for_device

                link.ask("resolved", options={"compute_dtype": resolve_for_device(job.config, pick_device()).compute_dtype})
            sink.event("info", f"Data parallel over {replicas.world_size} processes ({dist.get_backend()}): "
                       f"each step's batch of {job.config.batch_size} is split between them",
                       {"world_size": replicas.world_size, "parallelism": "data", "ranks": pids})
        result = train(job, sink, should_stop=replicas.agreed_stop(lambda: stop_requested or (link is not None and link.stop_requested())),
                       resume_from=args.resume, replicas=replicas, should_pause=should_pause)
    except DataValidationError as exc:
        return fail(exc.message, "data", role=exc.role)
    except ConfigError as exc:
        return fail(f"{exc.param}: {exc.message}" if exc.param and not served else exc.message, "config", param=exc.param, code=exc.code)
    except NonFiniteLossError as exc:
        report_error("non_finite", message=str(exc))
        raise
    except CheckpointError as exc:
        report_error("checkpoint", message=str(exc))
        raise
    except BaseException as exc:
        report_error("crash", message=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if progress:
            progress.close()
    if link is not None:
        link.ask("result", result=result.to_dict())
        link.close()
    if result.status == "stopped":
        if main_rank and not served:
            last = f"; resume with --resume {result.checkpoints[-1]}" if result.checkpoints else ""
            print(f"stopped at step {result.steps}{last}")
        return 130
    if main_rank and not served:
        print(json.dumps({"status": result.status, "steps": result.steps, "world_size": replicas.world_size,
                          "final_train_loss": result.final_train_loss, "final_valid_loss": result.final_valid_loss,
                          "adapter_dir": str(result.adapter_dir)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
