"""Engine check: train a random-weight model of a real shape for a few steps with the engine (NF4 + double
quantization, PagedAdamW8bit) and, in the same process on the same card, the standard recipe
(`shared/bench/standard_recipe.py`) on the same shape, batch and sequence length.

Records loss, tokens/s, peak memory (max allocated during training, after the model was built), the
engine's memory estimate, card, date and versions to `--out` (JSON) and prints a table.

    python bench/engine_check.py --shape llama3-8b --tokenizer DIR --out bench/results/DATE-CARD-engine.json
    python bench/engine_check.py --shape tiny --tokenizer DIR --out /tmp/x.json    # CPU, seconds (tests/bench)

The engine loads its model from a directory like any job, so the random model is first saved in bf16
safetensors (the base of a job is always a model directory); that time is reported, not counted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                        tie_word_embeddings=True),
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}


class CollectingSink:
    def __init__(self):
        self.steps: list[dict] = []
        self.events: list[str] = []

    def event(self, level, message, data=None):
        self.events.append(f"[{level}] {message}")
        print(f"  engine [{level}] {message}", flush=True)

    def metrics(self, step, values):
        self.steps.append(dict(values))

    def checkpoint(self, step, path, metrics):
        pass


def card_name(torch) -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}"


def make_model_dir(shape: str, tokenizer_dir: Path, workdir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    if cfg.vocab_size < len(tokenizer):
        raise SystemExit(f"shape {shape} has a smaller vocabulary than the tokenizer")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: an 8B model in fp32 would need 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    out = workdir / f"random-{shape}"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def make_dataset(tokenizer_dir: Path, path: Path, n_examples: int, seq: int, seed: int = 0) -> None:
    """Plain-text examples longer than `seq` tokens, so that max_seq_length=seq truncates each to exactly seq."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3][:5000]
    with path.open("w") as f:
        for _ in range(n_examples):
            text = " ".join(rng.choice(words) for _ in range(seq * 2))
            f.write(json.dumps({"text": text}) + "\n")


def run_engine(model_dir: Path, data: Path, workdir: Path, seq: int, bs: int, steps: int, warm: int, gc_on: bool) -> dict:
    import torch

    from worker.training.config import TrainingConfig
    from worker.training.memory import estimate_memory
    from worker.training.model import read_model_config
    from worker.training.trainer import TrainingJob, train

    cfg = TrainingConfig(
        quantization="4bit", quant_type="nf4", double_quant=True, compute_dtype="bf16",
        lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
        optimizer="paged_adamw_8bit", learning_rate=2e-4, lr_scheduler="constant", warmup_steps=0,
        batch_size=bs, micro_batch_size=bs, max_seq_length=seq, packing=True,
        gradient_checkpointing="on" if gc_on else "off", max_steps=warm + steps, shuffle=False, checkpoint_every=10_000,
    )
    sink = CollectingSink()
    t = time.time()
    result = train(TrainingJob(model_dir, data, workdir / "engine-out", cfg), sink)
    wall = time.time() - t
    timed = sink.steps[warm:]
    step_s = statistics.median(s["step_seconds"] for s in timed)
    tokens = statistics.median(s["tokens"] for s in timed)
    peak = max(s["peak_memory_bytes"] for s in sink.steps)
    est = estimate_memory(read_model_config(model_dir).to_dict(), cfg, tokens_per_micro_batch=bs * seq, gradient_checkpointing=gc_on)
    res = dict(
        variant="engine (NF4+DQ, packed, PagedAdamW8bit)" + (", checkpointing" if gc_on else ""),
        seq=seq, bs=bs, gc=gc_on, steps_timed=len(timed),
        step_s_median=round(step_s, 4), tokens_per_s=round(tokens / step_s, 1),
        peak_mem_gb=round(peak / 2**30, 2),
        estimate_torch_allocated_gb=round(est.torch_allocated_peak / 2**30, 2), estimate_total_gb=round(est.total / 2**30, 2),
        estimate_error=round(est.torch_allocated_peak / peak - 1, 3) if torch.cuda.is_available() else None,
        first_loss=round(sink.steps[0]["train_loss"], 4), last_loss=round(sink.steps[-1]["train_loss"], 4),
        losses=[round(s["train_loss"], 4) for s in sink.steps], status=result.status, wall_s=round(wall, 1),
    )
    del result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def run_baseline(shape: str, seq: int, bs: int, gc_on: bool, steps: int, warm: int, recipe_path: Path) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("standard_recipe", recipe_path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    res = recipe.run(shape, False, seq, bs, gc_on=gc_on, steps=steps, warm=warm)
    res["variant"] = "standard recipe" + (", checkpointing" if gc_on else "")
    return res


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer directory (e.g. the demo model's)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--no-gc", action="store_true", help="without gradient checkpointing")
    parser.add_argument("--baseline", type=Path, help="path of standard_recipe.py to run as the baseline (CUDA only)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    record = {"date": dt.date.today().isoformat(), "card": card_name(torch), "shape": args.shape, "versions": versions(),
              "seq": args.seq, "bs": args.bs, "steps": args.steps, "warm": args.warm, "results": []}
    print(json.dumps({k: record[k] for k in ("date", "card", "shape", "versions")}), flush=True)
    gc_on = not args.no_gc
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        if args.baseline and torch.cuda.is_available():
            t = time.time()
            try:
                record["results"].append(run_baseline(args.shape, args.seq, args.bs, gc_on, args.steps, args.warm, args.baseline))
            except Exception as exc:  # keep going: the engine's numbers are still worth having
                traceback.print_exc()
                record["results"].append({"variant": "standard recipe", "error": repr(exc)[:300]})
            record["results"][-1]["wall_s"] = round(time.time() - t, 1)
            print(json.dumps(record["results"][-1]), flush=True)
        t = time.time()
        model_dir = make_model_dir(args.shape, args.tokenizer, workdir)
        data = workdir / "data.jsonl"
        make_dataset(args.tokenizer, data, n_examples=max(10, args.bs * (args.steps + args.warm)), seq=args.seq)
        record["model_build_and_save_s"] = round(time.time() - t, 1)
        try:
            record["results"].append(run_engine(model_dir, data, workdir, args.seq, args.bs, args.steps, args.warm, gc_on))
        except Exception as exc:
            traceback.print_exc()
            record["results"].append({"variant": "engine", "error": repr(exc)[:500]})
        print(json.dumps(record["results"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\n{record['card']}  {record['date']}  shape={args.shape}  {args.bs} x {args.seq} tokens/step")
    print(f"{'variant':48} {'tok/s':>9} {'peak GiB':>8} {'est GiB':>7} {'loss first->last':>18}")
    for r in record["results"]:
        if "error" in r:
            print(f"{r['variant']:48} error: {r['error'][:80]}")
            continue
        est = r.get("estimate_torch_allocated_gb", "")
        print(f"{r['variant']:48} {r['tokens_per_s']:>9} {r['peak_mem_gb']:>8} {est:>7} {r['first_loss']:>8} -> {r['last_loss']}")
    return 0 if all("error" not in r for r in record["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
