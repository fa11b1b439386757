"""Performance bench: the engine against the standard QLoRA recipe, in one process on one card.

    python bench/perf.py --baseline standard_recipe.py --out bench/results/DATE-CARD.json     # GPU, a few minutes
    python bench/perf.py --tiny --out /tmp/perf.json                                          # CPU, seconds (tests/bench)

Cases (random weights, random token ids; every model is built here, nothing is read from disk):
  fixed      Llama-3-8B shape, 2 x 2048 tokens a step. The recipe (`../shared/bench/standard_recipe.py`, its
             `build`) against engine variants that add one change at a time, ending with the default
             (lean activations, fused kernels on CUDA, `gradient_checkpointing=auto` planned for 97% of the recipe's
             measured peak).
  realistic  For each `--lengths FILE` (one integer per line; default: the files shipped in bench/lengths),
             example lengths drawn from it and cut at 2048, the same examples for everyone, 4,096 token
             positions a step: the recipe with fixed-length batches (2 examples padded to 2048), the recipe
             padded to the longest example of the batch (2 examples, or as many as fit 4,096 positions once
             padded: the same token budget), and the engine with `micro_batch_tokens=4096`: each
             64 examples (a batch_size of 64) packed into rows of at most 4,096 tokens by the trainer's own
             packer, one row a step. Counted: useful (non-pad) tokens per second.
  big        Llama-3-70B shape, 1 x 2048, the engine with every layer checkpointed: does it fit one card.
Each variant: warm-up steps, then timed steps (CUDA synchronised); tokens/s from the median step, useful
tokens/s from the sums; peak = max allocated during the timed loop after the model was built; MFU counts
6 x parameters + attention FLOPs per token (the recipe's convention) against --peak-tflops.
Correctness guard: on one packed batch of the fixed case, the loss of the plain engine path (sdpa, full
logits) and of the optimized one (varlen attention, fused loss, lean activations, fused kernels on CUDA) must agree
(no_grad, same weights).

On the CPU (--tiny) there is no recipe: a plain engine variant stands in for it, so the bench's code runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}
DEFAULT_LENGTHS = [REPO / "bench" / "lengths" / name for name in ("sharegpt_v3.txt", "sharegpt_v3_first_exchange.txt")]
ENGINE_STEP_EXAMPLES = 64  # the realistic case's batch_size: the engine packs each 64 examples into rows
GIB = 1024**3

# The recipe's LoRA and optimizer settings; every engine variant uses them too.
# compute_dtype auto: bf16 on the recipe's cards; on a CPU the fast dtype there, so that --tiny stays quick on AVX2-only CPUs.
COMMON = dict(quantization="4bit", quant_type="nf4", double_quant=True, compute_dtype="auto", lora_r=16, lora_alpha=32,
              lora_dropout=0.05, target_modules="all-linear", optimizer="paged_adamw_8bit", learning_rate=2e-4,
              lr_scheduler="constant", warmup_steps=0, max_grad_norm=0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- data ------------------------------------------------------------------------------------------------

def read_lengths(path: Path) -> list[int]:
    values = [int(line) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not values or min(values) < 2:
        raise SystemExit(f"{path}: needs one integer >= 2 per line")
    return values


def random_examples(lengths: list[int], vocab: int, seed: int) -> list:
    """TokenizedExamples of the given lengths, random ids, every token a target (as in the recipe)."""
    from worker.training.data import TokenizedExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(TokenizedExample(input_ids=ids, labels=list(ids), truncated=False))
    return out


def padded_batches(examples: list, per_batch: int, pad_to: int | None) -> list[dict]:
    """The recipe's batches: `per_batch` examples padded to `pad_to` (fixed length) or to the longest of the batch."""
    groups = [examples[start : start + per_batch] for start in range(0, len(examples) - per_batch + 1, per_batch)]
    return [pad(group, pad_to) for group in groups]


def padded_budget_batches(examples: list, budget: int) -> list[dict]:
    """The recipe's batches at the same token budget: consecutive examples, as many as fit `budget` positions once
    padded to the longest of them (short examples: many a batch; one 2,048-token example: two)."""
    groups, current = [], []
    for e in examples:
        if current and (len(current) + 1) * max(len(e.input_ids), *(len(c.input_ids) for c in current)) > budget:
            groups.append(current)
            current = []
        current.append(e)
    return [pad(group, None) for group in groups + ([current] if current else [])]


def pad(group: list, pad_to: int | None) -> dict:
    """One padded batch: right padding to `pad_to` or to the longest example, pads masked out of loss and attention."""
    width = pad_to or max(len(e.input_ids) for e in group)
    ids = torch.zeros(len(group), width, dtype=torch.long)
    mask = torch.zeros(len(group), width, dtype=torch.long)
    labels = torch.full((len(group), width), -100, dtype=torch.long)
    for row, e in enumerate(group):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "useful": int(mask.sum())}


def engine_rows(examples: list, budget: int) -> list[list]:
    """The engine's passes with micro_batch_tokens=budget: each ENGINE_STEP_EXAMPLES examples (one optimizer
    step's batch) packed into rows of at most `budget` tokens by the trainer's packer."""
    from worker.training.data import pack_by_tokens

    return [row for start in range(0, len(examples), ENGINE_STEP_EXAMPLES)
            for row in pack_by_tokens(examples[start : start + ENGINE_STEP_EXAMPLES], budget)]


# --- timing ----------------------------------------------------------------------------------------------

KERNEL_KINDS = (  # kernel-name patterns -> where a step's device time goes (first match wins)
    ("attention", ("flash", "fmha", "attention", "varlen")),
    ("4-bit dequantize", ("dequant", "4bit", "nf4")),
    ("matmul", ("gemm", "cutlass", "cublas", "xmma", "nvjet", "matmul", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("optimizer", "adam", "8bit_blockwise", "optim")),
    ("compiled (fused_kernels)", ("triton_",)),  # torch.compile's Triton kernels: triton_poi_/triton_red_/triton_per_...
)
PROFILE = {"on": False}  # --profile: one extra step of the recipe and the engine's default (fixed, first realistic) is profiled


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, patterns in KERNEL_KINDS if any(p in lowered for p in patterns)), "other (elementwise, norms, copies)")


def profile_step(step, batch, device: torch.device) -> dict:
    """One more step under torch.profiler: the wall time, the device's busy time (sum of kernel times; on the
    CPU, of the ops' own CPU times), that time by kind of kernel, and the 12 most expensive kernels. A busy time
    far below the wall time means the step waits on Python and kernel launches, not on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        step(batch)
        sync(device)
    wall = time.perf_counter() - t
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [(e.key, getattr(e, attr, 0.0) / 1e3, e.count) for e in prof.key_averages()]
    rows = [r for r in rows if r[1] > 0 and (device.type == "cuda" or r[0].startswith("aten::"))]
    busy = sum(ms for _, ms, _ in rows)
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    top = sorted(rows, key=lambda r: -r[1])[:12]
    return {"wall_ms": round(wall * 1e3, 1), "busy_ms": round(busy, 1), "busy_share": round(busy / (wall * 1e3), 3),
            "by_kind_ms": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:120], "ms": round(ms, 2), "calls": c} for n, ms, c in top]}


def timed_loop(step, batches: list, warm: int, steps: int, device: torch.device, profile: bool = False) -> dict:
    """Run warm + steps steps (cycling through batches); returns timings, useful tokens and losses (and with
    --profile, a profile of one more step, after the peak was read)."""
    times, useful, losses = [], [], []
    reset_peak(device)
    for i in range(warm + steps):
        batch = batches[i % len(batches)]
        sync(device)
        t = time.perf_counter()
        loss, n_useful = step(batch)
        sync(device)
        if i >= warm:
            times.append(time.perf_counter() - t)
            useful.append(n_useful)
        losses.append(round(loss, 4))
    median = statistics.median(times)
    result = {"steps_timed": steps, "step_s_median": round(median, 4), "tokens_per_step": max(useful),
              "tokens_per_s": round(max(useful) / median, 1), "useful_tokens_per_s": round(sum(useful) / sum(times), 1),
              "peak_gib": peak_gib(device), "losses": losses}
    if profile:
        result["profile"] = profile_step(step, batches[(warm + steps) % len(batches)], device)
    return result


def mfu(tokens_per_s: float, shape: dict, n_params: int, seq: int, peak_tflops: float) -> float:
    attn = 2 * 2 * shape["num_hidden_layers"] * seq * shape["hidden_size"] * 3  # the recipe's approximation
    return round(tokens_per_s * (6 * n_params + attn) / (peak_tflops * 1e12), 4)


# --- the recipe ------------------------------------------------------------------------------------------

def load_recipe(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("standard_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def run_recipe(recipe, shape: str, cases: dict[str, list[dict]], warm: int, steps: int, device: torch.device) -> dict[str, dict]:
    """The recipe's model (its own `build`), trained on each case's padded batches with its loop."""
    model, opt, n_params, _trainable = recipe.build(shape, False, True)
    model.train()
    results = {}

    def step(batch):
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss), batch["useful"]

    for name, batches in cases.items():
        profile = PROFILE["on"] and name == "recipe, fixed 2x2048"
        results[name] = {**timed_loop(step, batches, warm, steps, device, profile), "params": n_params}
    model = opt = None  # free the recipe's model before the engine's is built
    free_memory(device)
    return results


# --- the engine ------------------------------------------------------------------------------------------

def engine_config(**options):
    from contract.options import TrainingConfig

    return TrainingConfig(**{**COMMON, **options})


def build_base(shape: str, device: torch.device):
    from transformers import LlamaConfig

    from bench.random_base import build_random_base

    t = time.time()
    config = LlamaConfig(**SHAPES[shape])
    base = build_random_base(config, engine_config(attn_implementation="sdpa"), device, seed=0)
    sync(device)
    return base, config, round(time.time() - t, 1)


def set_attention(model, name: str) -> None:
    from worker.training.attention import use

    model.config._attn_implementation = use(name)


def run_engine(base, model_config, cfg, groups: list[list], warm: int, steps: int, device: torch.device, tokens_per_micro: int,
               profile: bool = False):
    """One engine variant on `base`: adapters, plan and options from `cfg`, the trainer's loss and optimizer.
    Returns (result, base with the adapters removed)."""
    from contract.memory import LAYER_MODES, estimate_memory
    from worker.training import lean_activations
    from worker.training.data import collate_packed
    from worker.training.model import add_adapters, decide_for_device
    from worker.training.objectives.sft import forward_loss
    from worker.training.optim import build_optimizer, clip_and_norm
    from worker.training.runtime import autocast_dtype
    from worker.training.tunables import LOSS_CHUNK_TOKENS

    choices = decide_for_device(cfg, device, model_config=model_config, tokens_per_micro_batch=tokens_per_micro)
    set_attention(base, choices.attn_implementation)
    plan = choices.checkpoint_plan
    torch.manual_seed(0)
    built = add_adapters(base, cfg, device, plan, choices)
    model = built.model
    model.train()
    optimizer = build_optimizer(model.parameters(), cfg)
    amp = autocast_dtype(cfg)
    batches = [collate_packed(g) for g in groups]

    def step(batch):
        n_targets = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum, _n, _c = forward_loss(model, batch, device, amp, cfg.fused_cross_entropy)
        (loss_sum / n_targets).backward()
        clip_and_norm(model, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss_sum.detach()) / n_targets, batch["input_ids"].numel()

    resident = round(torch.cuda.memory_allocated(device) / GIB, 2) if device.type == "cuda" else None
    result = timed_loop(step, batches, warm, steps, device, profile)
    fused_on = choices.fused_kernels
    result["allocated_before_steps_gib"] = resident  # base + adapters: what the estimate's static terms predict
    estimate = estimate_memory(model_config, cfg, tokens_per_micro_batch=tokens_per_micro, layer_modes=plan,
                               loss_chunk_tokens=LOSS_CHUNK_TOKENS, sequence_tiling=choices.sequence_tiling)
    static = estimate.base_weights + estimate.lora_params
    result.update(plan={m: plan.count(m) for m in LAYER_MODES},
                  estimate_gib=round(estimate.torch_allocated_peak / GIB, 2), estimate_static_gib=round(static / GIB, 2),
                  estimate_error=round(estimate.torch_allocated_peak / GIB / result["peak_gib"] - 1, 3) if result["peak_gib"] else None,
                  options={k: v for k, v in cfg.resolved().items() if k in ("attn_implementation", "fused_cross_entropy",
                                                                            "gradient_checkpointing", "memory_budget_gb",
                                                                            "micro_batch_tokens", "lean_activations", "fused_kernels")},
                  fused_kernels_on=fused_on, fused_kernels_failed=lean_activations.fused_fallbacks() if fused_on else None)
    base = model.unload()  # the frozen base without adapters, for the next variant
    optimizer = model = built = None
    free_memory(device)
    return result, base


def loss_guard(base, groups: list[list], device: torch.device) -> dict:
    """The optimized path's loss equals the plain path's on the same packed batch and weights."""
    from worker.training.data import collate_packed
    from worker.training.model import add_adapters, decoder_layers
    from worker.training.objectives.sft import forward_loss
    from worker.training.runtime import autocast_dtype

    batch = collate_packed(groups[0])
    out = {}
    for name, attn, fused in (("plain", "sdpa", False), ("optimized", "varlen", True)):
        cfg = engine_config(attn_implementation=attn, fused_cross_entropy=fused, lean_activations=fused, gradient_checkpointing="off")
        set_attention(base, attn)
        torch.manual_seed(0)
        built = add_adapters(base, cfg, device, ("off",) * len(decoder_layers(base)))
        built.model.eval()
        with torch.no_grad():
            loss_sum, n, _c = forward_loss(built.model, batch, device, autocast_dtype(cfg), fused)
        out[name] = float(loss_sum) / n
        base = built.model.unload()
        del built
        free_memory(device)
    out["relative_difference"] = abs(out["optimized"] - out["plain"]) / abs(out["plain"])
    out["ok"] = out["relative_difference"] < 1e-2  # bf16 matmuls in a different order: agreement to ~1e-3 expected
    return out, base


# --- main ------------------------------------------------------------------------------------------------

def versions() -> dict:
    """The trainer's version record (what every checkpoint stores) plus the CUDA version."""
    from worker.training.runtime import versions as engine_versions

    return {**engine_versions(), "cuda": torch.version.cuda}


def card(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def attempt(record: dict, name: str, fn):
    """Run one measurement; an error is recorded and the bench goes on."""
    t = time.time()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others' numbers
        traceback.print_exc()
        result = {"error": repr(exc)[:500]}
    if isinstance(result, dict):
        result["wall_s"] = round(time.time() - t, 1)
    record["results"][name] = result
    print(name, json.dumps({k: v for k, v in result.items() if k not in ("losses", "profile")}), flush=True)
    if "profile" in result:
        prof = result["profile"]
        print(f"  profile: wall {prof['wall_ms']} ms, busy {prof['busy_ms']} ms;", json.dumps(prof["by_kind_ms"]), flush=True)
    save(record)  # after every measurement: a run cut short keeps what it measured
    return result


def save(record: dict) -> None:
    out = Path(record["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="standard_recipe.py to run as the baseline (CUDA only)")
    parser.add_argument("--lengths", type=Path, action="append", help="example lengths, one integer per line (repeatable; "
                        "default: " + ", ".join(p.name for p in DEFAULT_LENGTHS) + ")")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the test suite's run)")
    parser.add_argument("--skip-big", action="store_true", help="leave out the 70B case")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the card's dense bf16 ceiling (H200: ~790 measured)")
    parser.add_argument("--profile", action="store_true", help="profile one more step of the recipe (fixed case) and of the "
                        "engine's default (fixed case, first lengths file): where the time goes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    PROFILE["on"] = args.profile

    device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    shape, big = ("tiny", "tiny") if args.tiny else ("llama3-8b", "llama3-70b")
    seq, per_step = (128, 2) if args.tiny else (2048, 2)
    budget_tokens = seq * per_step
    vocab = SHAPES[shape]["vocab_size"]
    lengths_files = args.lengths or [path for path in DEFAULT_LENGTHS if path.is_file()]
    from worker.training.model import resolve_compute_dtype

    record = {"date": dt.date.today().isoformat(), "card": card(device), "versions": versions(), "shape": shape, "big_shape": big,
              "seq": seq, "sequences_per_step": per_step, "steps": args.steps, "warm": args.warm,
              "lengths_files": [str(path) for path in lengths_files], "out": str(args.out), "results": {},
              "compute_dtype": resolve_compute_dtype(COMMON["compute_dtype"], device)}
    print(json.dumps({k: record[k] for k in ("date", "card", "versions")}), flush=True)
    n_steps = args.warm + args.steps

    # The same examples for everyone.
    fixed = random_examples([seq] * per_step * n_steps, vocab, seed=1)
    realistic = {}  # lengths file stem -> examples drawn from it
    record["realistic_mean_length"] = {}
    for path in lengths_files:
        rng = random.Random(0)
        lengths = read_lengths(path)
        drawn = [min(rng.choice(lengths), seq) for _ in range(ENGINE_STEP_EXAMPLES * n_steps)]
        realistic[path.stem] = random_examples(drawn, vocab, seed=2)
        record["realistic_mean_length"][path.stem] = round(sum(drawn) / len(drawn), 1)

    # 1. The recipe (GPU) or its CPU stand-in.
    recipe_peak = None
    if args.baseline and device.type == "cuda":
        recipe = load_recipe(args.baseline)
        cases = {"recipe, fixed 2x2048": padded_batches(fixed, per_step, seq)}
        for stem, examples in realistic.items():
            cases[f"recipe, {stem}: fixed-length batches"] = padded_batches(examples, per_step, seq)
            cases[f"recipe, {stem}: padded to longest"] = padded_batches(examples, per_step, None)
            cases[f"recipe, {stem}: padded to longest, up to {budget_tokens} positions"] = padded_budget_batches(examples, budget_tokens)
        out = attempt(record, "recipe", lambda: run_recipe(recipe, shape, cases, args.warm, args.steps, device))
        record["results"].pop("recipe")
        wall = out.pop("wall_s", None)
        for name, result in (out.items() if "error" not in out else [("recipe", out)]):
            result["wall_s"] = wall
            result["mfu"] = mfu(result["tokens_per_s"], SHAPES[shape], result["params"], seq, args.peak_tflops) if "params" in result else None
            record["results"][name] = result
        recipe_peak = record["results"].get("recipe, fixed 2x2048", {}).get("peak_gib")

    # 2. The engine on the same shape: one change at a time.
    base, model_config, build_s = build_base(shape, device)
    record["engine_base_build_s"] = build_s
    n_params = sum(p.numel() for p in base.parameters())  # packed 4-bit weights count half: use the shape's count
    n_params = record["results"].get("recipe, fixed 2x2048", {}).get("params", n_params)
    fixed_groups = [fixed[i : i + per_step] for i in range(0, len(fixed), per_step)]
    guard, base = loss_guard(base, fixed_groups, device)
    record["loss_guard"] = guard
    print("loss guard", json.dumps(guard), flush=True)
    save(record)
    budget = round(recipe_peak * 0.97, 2) if recipe_peak else None
    auto = dict(gradient_checkpointing="auto", memory_budget_gb=budget) if budget else dict(gradient_checkpointing="auto")
    for_budget = f" for {budget} GiB" if budget else ""
    variants = [
        ("engine, fixed: plain (sdpa, full logits, every layer checkpointed)",
         dict(attn_implementation="sdpa", fused_cross_entropy=False, gradient_checkpointing="on", lean_activations=False)),
        ("engine, fixed: + fused loss", dict(attn_implementation="sdpa", gradient_checkpointing="on", lean_activations=False)),
        ("engine, fixed: + varlen attention", dict(gradient_checkpointing="on", lean_activations=False)),
        ("engine, fixed: + lean activations (every layer still checkpointed)", dict(gradient_checkpointing="on", fused_kernels="off")),
        ("engine, fixed: + fused kernels (every layer still checkpointed)", dict(gradient_checkpointing="on", fused_kernels="on")),
        ("engine, fixed: varlen + auto plan" + for_budget + ", without lean activations", dict(auto, lean_activations=False)),
        ("engine, fixed: default (lean activations, fused kernels on CUDA, auto plan" + for_budget + ")", auto),
    ]
    box = {"base": base}  # the base travels through `box` only, so that nothing else keeps it alive

    def one(cfg, groups, with_mfu=True, profile=False):
        result, box["base"] = run_engine(box.pop("base"), model_config, cfg, groups, args.warm, args.steps, device, budget_tokens,
                                         profile)
        if with_mfu:
            result["mfu"] = mfu(result["tokens_per_s"], SHAPES[shape], n_params, seq, args.peak_tflops)
        return result

    def measure(name, cfg, groups, **kwargs):
        attempt(record, name, lambda: one(cfg, groups, **kwargs))
        if "base" not in box:  # the variant failed: rebuild a clean base
            free_memory(device)
            box["base"] = build_base(shape, device)[0]

    base = None
    for name, options in variants:
        measure(name, engine_config(**options), fixed_groups, profile=args.profile and options is variants[-1][1])
    default = variants[-1][1]
    for i, (stem, examples) in enumerate(realistic.items()):
        # profile: is a packed row slower per token than a fixed one, and where
        measure(f"engine, {stem}: packed rows of {budget_tokens}",
                engine_config(**default, micro_batch_tokens=budget_tokens, max_seq_length=seq),
                engine_rows(examples, budget_tokens), with_mfu=False, profile=args.profile and i == 0)
    box.clear()
    free_memory(device)

    # 3. The big shape: does it fit one card.
    if not args.skip_big:
        def big_case():
            resident = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else 0.0
            if resident > 0.1:  # the run of 2026-11-28 kept the 8B base: its 5.31 GiB were in the 70B peak
                raise RuntimeError(f"{resident:.2f} GiB still allocated before the big model is built")
            base, config, build_s = build_base(big, device)
            after_build = round(torch.cuda.memory_allocated(device) / GIB, 2) if device.type == "cuda" else None
            examples = random_examples([seq] * (args.warm + 2), SHAPES[big]["vocab_size"], seed=3)
            result, base = run_engine(base, config, engine_config(gradient_checkpointing="on"), [[e] for e in examples],
                                      1, 2, device, seq)
            result["build_s"] = build_s
            result["allocated_after_build_gib"] = after_build
            del base
            free_memory(device)
            return result

        attempt(record, f"engine, {big}, 1x{seq}, every layer checkpointed", big_case)

    save(record)
    print_table(record)
    failed = [name for name, r in record["results"].items() if "error" in r]
    return 1 if failed or not guard["ok"] else 0


def print_table(record: dict) -> None:
    print(f"\n{record['card']}  {record['date']}  torch {record['versions']['torch']}  bnb {record['versions']['bitsandbytes']}")
    print(f"{'variant':96} {'tok/s':>9} {'useful/s':>9} {'peak GiB':>8} {'est GiB':>7} {'MFU':>6}")
    for name, r in record["results"].items():
        if "error" in r:
            print(f"{name:96} error: {r['error'][:60]}")
            continue
        print(f"{name:96} {r['tokens_per_s']:>9} {r['useful_tokens_per_s']:>9} {r['peak_gib']!s:>8} {r.get('estimate_gib', '')!s:>7} "
              f"{r.get('mfu', '')!s:>6}")
    print("loss guard:", record["loss_guard"])


if __name__ == "__main__":
    sys.exit(main())
