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


def main(argv: list[str] | None = None) -> int:
    from worker.training.cli import parse_args

    args = parse_args(argv, prog="python -m worker.training.distributed", description=__doc__)
    init_process_group()
    try:
        return _run(args)
    finally:
        dist.destroy_process_group()


def _run(args: Any) -> int:
    from contract.data_format import DataValidationError
    from contract.options import ConfigError
    from worker.training.cli import ProgressSink, read_job
    from worker.training.parallel import DataParallel
    from worker.training.sinks import JsonlSink, MultiSink, NullSink
    from worker.training.trainer import train

    replicas = DataParallel()
    main_rank = replicas.is_main

    def fail(message: str) -> int:
        if main_rank:
            print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        job = read_job(args)
    except (ValueError, OSError) as exc:
        return fail(str(exc))
    stop_requested = False

    def request_stop(signum: int, frame: Any) -> None:  # SIGUSR1 to any rank: all stop after the same step
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGUSR1, request_stop)
    progress = ProgressSink() if main_rank else None
    sink = MultiSink(progress, JsonlSink(job.output_dir / "metrics.jsonl")) if progress else NullSink()
    try:
        if main_rank:
            sink.event("info", f"Data parallel over {replicas.world_size} processes ({dist.get_backend()}): "
                       f"each step's batch of {job.config.batch_size} is split between them",
                       {"world_size": replicas.world_size, "parallelism": "data"})
        result = train(job, sink, should_stop=replicas.agreed_stop(lambda: stop_requested), resume_from=args.resume,
                       replicas=replicas)
    except DataValidationError as exc:
        return fail(str(exc))
    except ConfigError as exc:
        return fail(f"{exc.param}: {exc.message}" if exc.param else exc.message)
    finally:
        if progress:
            progress.close()
    if result.status == "stopped":
        if main_rank:
            last = f"; resume with --resume {result.checkpoints[-1]}" if result.checkpoints else ""
            print(f"stopped at step {result.steps}{last}")
        return 130
    if main_rank:
        print(json.dumps({"status": result.status, "steps": result.steps, "world_size": replicas.world_size,
                          "final_train_loss": result.final_train_loss, "final_valid_loss": result.final_valid_loss,
                          "adapter_dir": str(result.adapter_dir)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
