"""Routes bench: the same training job on each quantization route of the base, on the CPU, in one run.

    python bench/routes.py --out bench/results/DATE-cpu-routes-NAME.json            # SmolLM2-135M-Instruct
    python bench/routes.py --base gptq=/models/SmolLM2-gptq,quantization=gptq ...   # and pre-quantized copies

Each route trains `--warm + --steps` steps of the engine (`trainer.train`) on the same examples with the same options
(LoRA r=16 on all linears, batch `--batch-size`, no shuffling), in a child process of its own, so that its peak
memory is its own:
  4bit   bitsandbytes NF4 + double quantization (the default)     8bit   bitsandbytes LLM.int8
  hqq    hqq 4-bit, groups of 64                                  none   the 16/32-bit base (the baseline)
  --base LABEL=DIR[,option=value...]: a base directory of its own (a GPTQ or AWQ copy), trained with those options.
Recorded per route: seconds per timed step, useful tokens per second, the loss of each step, the seconds to load
(and quantize) the base, the bytes of the base's weights as loaded (quantized linears with their scales, embeddings,
norms), and the process's resident memory after loading and at its peak (RSS, Linux's VmRSS and VmHWM). The
record names the CPU, the date, the compute dtype and the versions; each route's speed and base bytes are also
given relative to the `none` route of the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ROUTES = {
    "4bit": {"quantization": "4bit"},
    "8bit": {"quantization": "8bit"},
    "hqq": {"quantization": "hqq", "hqq_bits": 4, "hqq_group_size": 64},
    "none": {"quantization": "none"},
}


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now, VmHWM: the peak), or 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def base_weight_bytes(model: Any) -> int:
    """Bytes of a built model's frozen base as held in memory: every non-LoRA parameter and buffer, and the
    quantization constants the quantized layers keep outside their parameters (bitsandbytes' quant states and
    LLM.int8's row scales, hqq's scales and zeros)."""
    import torch

    def size(t: Any) -> int:
        return t.numel() * t.element_size() if torch.is_tensor(t) else 0

    seen: set[int] = set()
    total = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" not in name and id(tensor) not in seen:
            seen.add(id(tensor))
            total += size(tensor)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:  # bitsandbytes 4-bit
            total += size(state.absmax) + size(state.code)
            if getattr(state, "nested", False):
                total += size(state.state2.absmax) + size(state.state2.code) + size(state.offset)
        scb = getattr(getattr(module, "weight", None), "SCB", None)
        total += size(scb)  # bitsandbytes 8-bit row scales
        meta = getattr(module, "meta", None)
        if isinstance(meta, dict) and hasattr(module, "W_q"):  # hqq
            total += sum(size(v) for v in meta.values())
            if id(module.W_q) not in seen:
                total += size(module.W_q)
    return total


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One route, in this (child) process: train, and measure."""
    import torch
    from cpu import StepTimes, summarise

    from contract.options import TrainingConfig
    from worker.training import trainer

    captured: dict[str, Any] = {}
    build_model = trainer.build_model

    def measuring_build_model(*args: Any, **kwargs: Any) -> Any:  # the model the trainer builds, weighed once loaded
        started = time.perf_counter()
        built = build_model(*args, **kwargs)
        captured.update(load_seconds=round(time.perf_counter() - started, 2), base_weight_bytes=base_weight_bytes(built.model),
                        rss_after_load_bytes=_status_bytes("VmRSS"))
        return built

    trainer.build_model = measuring_build_model
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = TrainingConfig(**spec["options"])
    sink = StepTimes()
    started = time.perf_counter()
    trainer.train(trainer.TrainingRequest(Path(spec["model"]), Path(spec["data"]), Path(spec["workdir"]), cfg), sink)
    result = summarise(spec["label"], sink.steps, spec["warm"], wall_seconds=round(time.perf_counter() - started, 1))
    result["seconds_per_step"] = round(result["seconds"] / max(result["timed_steps"], 1), 3)
    result.update(captured, peak_rss_bytes=_status_bytes("VmHWM"), options=spec["options"],
                  model_loaded=next(m for m in sink.events if m.startswith("Model loaded")))
    return result


def run_route(label: str, model_dir: Path, route_options: dict[str, Any], args: argparse.Namespace, data: Path, workdir: Path) -> dict[str, Any]:
    options = dict(batch_size=args.batch_size, micro_batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                   max_steps=args.warm + args.steps, shuffle=False, checkpoint_every=10_000, lora_r=16, **route_options)
    spec = {"label": label, "model": str(model_dir), "data": str(data), "workdir": str(workdir / label), "options": options,
            "warm": args.warm, "threads": args.threads}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        return {"variant": label, "options": options, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_base(text: str) -> tuple[str, Path, dict[str, Any]]:
    """`LABEL=DIR[,option=value...]`; a value is read as JSON where it parses (numbers, true/false), else as text."""
    label, _, rest = text.partition("=")
    if not label or not rest:
        raise argparse.ArgumentTypeError(f"--base {text!r}: expected LABEL=DIR[,option=value...]")
    directory, *pairs = rest.split(",")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return label, Path(directory), options


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "hqq", "gptqmodel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct",
                        help="the 16-bit base the on-the-fly routes quantize (SmolLM2-135M-Instruct, imported if missing)")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated, of {', '.join(ROUTES)}")
    parser.add_argument("--base", type=parse_base, action="append", default=[], metavar="LABEL=DIR[,option=value...]",
                        help="also train on this base directory (e.g. a GPTQ or AWQ copy), with these options")
    parser.add_argument("--examples", type=int, default=16, help="at least 10 (the engine's minimum)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per route (0: torch's default)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per route")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the record here as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    routes = [r for r in args.routes.split(",") if r]
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        parser.error(f"unknown routes {unknown}; known: {list(ROUTES)}")
    if args.examples < args.batch_size * (args.warm + args.steps):
        parser.error("--examples must cover (warm + steps) batches, so that no example is timed twice")

    import torch
    from cpu import cpu_name, write_chat_file

    from worker.training.demo_model import import_demo_model
    from worker.training.model import resolve_compute_dtype

    model_dir = import_demo_model(args.model) if args.model == parser.get_default("model") else args.model
    record: dict[str, Any] = {
        "bench": "routes", "date": dt.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "compute_dtype": resolve_compute_dtype("auto", torch.device("cpu")), "model": model_dir.name,
        "examples": args.examples, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "warm": args.warm,
        "steps": args.steps, "versions": versions(), "results": [],
    }
    print(f"{record['cpu']} ({record['cpu_capability']}), compute_dtype {record['compute_dtype']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_chat_file(Path(tmp) / "train.jsonl", args.examples, args.max_seq_length, args.seed)
        runs = [(route, model_dir, ROUTES[route]) for route in routes] + args.base
        for label, directory, options in runs:
            result = run_route(label, directory, options, args, data, Path(tmp))
            record["results"].append(result)
            if "error" in result:
                print(f"{label:<12} failed: {result['error']}", flush=True)
                continue
            print(f"{label:<12} {result['seconds_per_step']:>8.2f} s/step {result['tokens_per_second']:>8.1f} tokens/s  "
                  f"base {result['base_weight_bytes'] / 2**20:>7.1f} MiB  peak RSS {result['peak_rss_bytes'] / 2**20:>7.1f} MiB  "
                  f"load {result['load_seconds']} s", flush=True)
    baseline = next((r for r in record["results"] if r["variant"] == "none" and "error" not in r), None)
    if baseline is not None:
        for r in record["results"]:
            if "error" not in r:
                r["speed_vs_none"] = round(r["tokens_per_second"] / baseline["tokens_per_second"], 2)
                r["base_bytes_vs_none"] = round(r["base_weight_bytes"] / baseline["base_weight_bytes"], 3)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all("error" not in r for r in record["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
