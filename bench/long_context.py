"""Long-context GPU check: the longest sequence an 8B QLoRA job trains on this card, its peak against the estimate,
and the speed of offloaded checkpoints and tiling against plain checkpointing where that fits.

    python bench/long_context.py --out bench/results/DATE-CARD-long-context.json            # GPU, --time-limit s
    python bench/long_context.py --tiny --out /tmp/long.json                                 # CPU smoke (tests/bench)

A random Llama-3-8B-shaped NF4 base (bench/random_base.py), LoRA r=16 on all linears, batch 1: one packed row of
random token ids per step, the engine's plan for this card (`gradient_checkpointing: auto`, `sequence_tiling: auto`:
the budget is 85% of the memory free at the start, as a job gets). Steps:

1. search: binary search over the length, from a length that trains (--low) to the estimate's longest for the
   card x --over, each probe a warm-up step and --steps timed steps; a probe that runs out of memory is a miss. Stops
   when the bracket is within --resolution tokens or the time is up (the longest that trained so far is reported).
2. estimate: at each length that trained, the peak (torch.cuda.max_memory_allocated over the timed steps) against the
   estimate of the plan the engine chose (torch_allocated_peak); the check wants them within 10%.
3. speed: at the longest length plain checkpointing fits (every layer 'on', no tiling), tokens/s of that plan and of
   every layer offloaded with the MLPs tiled.

On the CPU (--tiny) a tiny shape, a fake budget and small lengths: the code path runs, the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GIB = 1024**3
SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
OPTIONS = dict(quantization="4bit", lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
               optimizer="paged_adamw_8bit", micro_batch_size=1, batch_size=1, max_grad_norm=0.3)


def config(length: int, **options):
    from contract.options import TrainingConfig

    return TrainingConfig(**{**OPTIONS, "max_seq_length": min(length, 1048576), **options})


def probe(base, model_config, length: int, device: torch.device, steps: int, **options) -> dict:
    """Train `steps` timed steps (after one warm-up) on one random row of `length` tokens with the plan the engine
    makes for it (where the estimate refuses the length: every layer offloaded and the MLPs tiled, to measure past
    the estimate). Returns the result (ok False on running out of memory) and leaves the base without adapters."""
    from contract.device_choices import ContextTooLong
    from contract.memory import estimate_memory
    from worker.training.model import add_adapters, decide_for_device
    from worker.training.objectives.sft import forward_loss
    from worker.training.optim import build_optimizer
    from worker.training.runtime import autocast_dtype
    from worker.training.tunables import LOSS_CHUNK_TOKENS

    cfg = config(length, **options)
    result: dict = {"length": length, "options": options}
    model = optimizer = built = None
    try:
        try:
            choices = decide_for_device(cfg, device, model_config=model_config, tokens_per_micro_batch=length)
        except ContextTooLong:
            result["refused_by_estimate"] = True
            cfg = config(length, gradient_checkpointing="offload", sequence_tiling=True)
            choices = decide_for_device(cfg, device, model_config=model_config, tokens_per_micro_batch=length)
        cfg = choices.apply(cfg)
        built = add_adapters(base, cfg, device, choices.checkpoint_plan, choices)
        model = built.model
        model.train()
        optimizer = build_optimizer(model.parameters(), cfg)
        generator = torch.Generator().manual_seed(length)
        ids = torch.randint(0, model_config.vocab_size, (1, length), generator=generator)
        batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(length).unsqueeze(0)}
        amp = autocast_dtype(cfg)
        times = []
        for i in range(steps + 1):
            if i == 1 and device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            loss, n, _ = forward_loss(model, batch, device, amp, True)
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
        estimate = estimate_memory(model_config, cfg, tokens_per_micro_batch=length, layer_modes=choices.checkpoint_plan,
                                   loss_chunk_tokens=LOSS_CHUNK_TOKENS, sequence_tiling=choices.sequence_tiling)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result.update(ok=True, tokens_per_s=round(length / min(times), 1), step_s=round(min(times), 3),
                      plan={m: choices.checkpoint_plan.count(m) for m in set(choices.checkpoint_plan)},
                      sequence_tiling=choices.sequence_tiling,
                      estimate_gib=round(estimate.torch_allocated_peak / GIB, 3), host_gib=round(estimate.host_activations / GIB, 3),
                      host_bytes=estimate.host_activations,
                      peak_gib=round(peak / GIB, 3) if peak is not None else None,
                      estimate_error=round(estimate.torch_allocated_peak / peak - 1, 3) if peak else None)
    except torch.OutOfMemoryError:
        result.update(ok=False, error="out of memory")
    except Exception as exc:  # noqa: BLE001 - a refused length (ContextTooLong) or another failure: a miss, said why
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        if model is not None:
            model.unload()  # the same base object, its adapters removed, for the next probe
        model = optimizer = built = None  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def search(base, model_config, device, low: int, high: int, resolution: int, deadline: float, steps: int, log, **options) -> tuple[int, list]:
    """The longest length in [low, high] that trains (binary search; `low` must train)."""
    probes, best = [], 0
    first = probe(base, model_config, low, device, steps, **options)
    probes.append(first)
    log(first)
    if not first["ok"]:
        return 0, probes
    best = low
    while high - best > resolution and time.time() < deadline:
        middle = (best + high + 1) // 2
        result = probe(base, model_config, middle, device, steps, **options)
        probes.append(result)
        log(result)
        if result["ok"]:
            best = middle
        else:
            high = middle - 1
    return best, probes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke: tiny shape, small lengths")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--low", type=int, default=32768, help="a length expected to train (the search's lower end)")
    parser.add_argument("--over", type=float, default=1.2, help="the search's upper end: the estimate's longest times this")
    parser.add_argument("--resolution", type=int, default=8192)
    parser.add_argument("--time-limit", type=float, default=1800, help="seconds for the search")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)

    from transformers import LlamaConfig

    from bench.random_base import build_random_base
    from contract.device_choices import longest_fitting_tokens
    from worker.training.model import pick_device
    from worker.training.runtime import versions
    from worker.training.tunables import FREE_MEMORY_BUDGET_SHARE, LOSS_CHUNK_TOKENS

    device = pick_device()
    shape = "tiny" if args.tiny else "llama3-8b"
    if args.tiny:
        args.low, args.resolution = min(args.low, 64), min(args.resolution, 32)
    if device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * FREE_MEMORY_BUDGET_SHARE)
        search_options: dict = {}  # the engine's own plan for the card
    else:  # the CPU plans no memory: a small pretend budget for the estimate, and the long-context path forced
        budget = GIB // 4
        search_options = {"gradient_checkpointing": "offload", "sequence_tiling": True}
    model_config = LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 20)
    record: dict = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "shape": shape,
                    "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "versions": versions(),
                    "budget_gib": round(budget / GIB, 3), "options": OPTIONS}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")

    def log(result: dict) -> None:
        print(json.dumps(result), flush=True)

    expected = longest_fitting_tokens(model_config, config(args.low), budget_bytes=budget, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    high = max(args.low, int(expected * args.over))
    if args.tiny:
        high = min(high, 192)
    record["estimated_longest"] = expected
    base = build_random_base(model_config, config(args.low, attn_implementation="varlen"), device, seed=0)
    deadline = time.time() + args.time_limit
    longest, probes = search(base, model_config, device, args.low, high, args.resolution, deadline, args.steps, log, **search_options)
    trained = [p for p in probes if p["ok"]]
    record.update(longest=longest, probes=probes,
                  estimate_within_10_percent=all(abs(p["estimate_error"]) <= 0.10 for p in trained if p["estimate_error"] is not None))
    save()

    # speed: the longest length plain checkpointing fits, plain against offloaded + tiled
    plain_longest = longest_fitting_tokens(model_config, config(args.low, gradient_checkpointing="on", sequence_tiling=False),
                                           budget_bytes=budget, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    length = min(plain_longest, longest) if longest else 0
    if args.tiny:
        length = min(length, 128)
    if length >= 16:
        plain = probe(base, model_config, length, device, args.steps, gradient_checkpointing="on", sequence_tiling=False)
        offloaded = probe(base, model_config, length, device, args.steps, gradient_checkpointing="offload", sequence_tiling=True)
        log(plain)
        log(offloaded)
        record["speed"] = {"length": length, "plain": plain, "offloaded_and_tiled": offloaded,
                           "ratio": round(offloaded["tokens_per_s"] / plain["tokens_per_s"], 3) if plain["ok"] and offloaded["ok"] else None}
    save()
    print(f"longest {longest:,} tokens (estimate {expected:,}); estimate within 10%: {record['estimate_within_10_percent']}")
    return 0 if longest else 1


if __name__ == "__main__":
    sys.exit(main())
