"""Run a training job from a YAML or JSON file, without the service.

    python -m worker.training.cli job.yaml [--base-model DIR] [--output DIR] [--resume CHECKPOINT_DIR]

The file names the data and the options (every key of docs/training.md under `hyperparameters`):

    base_model: .qlora/models/SmolLM2-135M-Instruct
    train_file: examples/facts.jsonl
    validation_file: examples/facts.jsonl     # optional
    output_dir: runs/facts
    hyperparameters: {lora_r: 16, n_epochs: 3}

Relative paths are relative to the file. Progress shows as a bar; events and metrics also go to
OUTPUT/metrics.jsonl. Exit status: 0 succeeded, 2 invalid options or data (the faults are printed), 130 stopped.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from contract.metrics import StepMetrics


class ProgressSink:
    """A tqdm bar over optimizer steps; events are printed above it."""

    def __init__(self, total: int | None = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def start(self, total_steps: int) -> None:
        self.bar.total = total_steps
        self.bar.refresh()

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.bar.write(f"[{level}] {message}")

    def metrics(self, step: int, values: StepMetrics) -> None:
        self.bar.update(step - self.bar.n)
        shown = {"loss": f"{values.train_loss:.4f}", "lr": f"{values.learning_rate:.2e}", "tok/s": f"{values.tokens_per_second:.0f}"}
        if values.valid_loss is not None:
            shown["valid"] = f"{values.valid_loss:.4f}"
        self.bar.set_postfix(shown)

    def checkpoint(self, step: int, path: Path, metrics: StepMetrics) -> None:
        self.bar.write(f"[info] checkpoint at step {step}: {path}")

    def close(self) -> None:
        self.bar.close()


def parse_args(argv: list[str] | None, prog: str = "qlora-train", description: str | None = __doc__) -> argparse.Namespace:
    """The job file and its overrides, as this CLI and the distributed entrypoint (distributed.py) take them."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job_file", type=Path, help="YAML or JSON job file")
    parser.add_argument("--base-model", type=Path, help="override base_model")
    parser.add_argument("--output", type=Path, help="override output_dir")
    parser.add_argument("--resume", type=Path, help="resume from this checkpoint directory")
    parser.add_argument("--initial-adapter", type=Path, help="start the LoRA from this adapter directory (a fine-tuned model's, "
                        "same base and LoRA shape) instead of a fresh one")
    return parser.parse_args(argv)


def read_job(args: argparse.Namespace) -> Any:
    """The TrainingRequest a job file and its overrides name. Raises ValueError or OSError (a bad file or option)."""
    from contract.base_model import read_config_json
    from contract.job_file import ENGINE_KEYS, read_job_file
    from contract.options import TrainingConfig
    from contract.prequantized import decide_quantization
    from worker.training.trainer import TrainingRequest

    spec = read_job_file(args.job_file, ENGINE_KEYS)
    here = args.job_file.resolve().parent

    def path_of(key: str, override: Path | None = None) -> Path | None:
        if override is not None:
            return override
        value = spec.get(key)
        return None if value is None else (here / value if not Path(value).is_absolute() else Path(value))

    base_model, train_file, output_dir = path_of("base_model", args.base_model), path_of("train_file"), path_of("output_dir", args.output)
    for key, value in (("base_model", base_model), ("train_file", train_file), ("output_dir", output_dir)):
        if value is None:
            raise ValueError(f"{args.job_file}: {key} is required")
    # A pre-quantized base decides the quantization; the options as given are checked against it.
    config = TrainingConfig.from_dict(decide_quantization(spec.get("hyperparameters") or {}, read_config_json(base_model)))
    return TrainingRequest(base_model, train_file, output_dir, config, path_of("validation_file"),
                           initial_adapter=getattr(args, "initial_adapter", None))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from contract.data_format import DataValidationError
    from contract.options import ConfigError
    from worker.training.sinks import JsonlSink, MultiSink
    from worker.training.trainer import train

    try:
        job = read_job(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output_dir = job.output_dir
    stop_requested = False

    def request_stop(signum, frame):  # first Ctrl-C stops cleanly after the current micro-batch
        nonlocal stop_requested
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    progress = ProgressSink()
    try:
        result = train(job, MultiSink(progress, JsonlSink(output_dir / "metrics.jsonl")), should_stop=lambda: stop_requested,
                       resume_from=args.resume)
    except DataValidationError as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        progress.close()
        print(f"error: {exc.param}: {exc.message}" if exc.param else f"error: {exc.message}", file=sys.stderr)
        return 2
    progress.close()
    if result.status == "stopped":
        print(f"stopped at step {result.steps}; resume with --resume {result.checkpoints[-1]}" if result.checkpoints else f"stopped at step {result.steps}")
        return 130
    print(json.dumps({"status": result.status, "steps": result.steps, "final_train_loss": result.final_train_loss,
                      "final_valid_loss": result.final_valid_loss, "adapter_dir": str(result.adapter_dir)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
