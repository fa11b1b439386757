"""Memory traffic of the elementwise work of one decoder layer, per token: a CPU count that needs no GPU.

    python bench/traffic.py --kernels --out bench/results/DATE-cpu-traffic.json     # Llama-3-8B widths, ~2 minutes
    python bench/traffic.py --tiny --out /tmp/traffic.json                          # seconds (tests/bench)

Outside the big matmuls, a QLoRA step on a GPU is bound by memory bandwidth: each elementwise operation (norms,
SwiGLU, LoRA dropout, scaling, sums, dtype casts) reads its inputs from memory and writes its outputs back. This
script counts those bytes in one training step (forward + backward) of one decoder layer of a two-layer model with
the given widths (the second layer, whose input needs a gradient like every layer of a deep model), with
`TorchDispatchMode`: for every operation, the bytes of its tensor inputs and outputs. Not counted: matmuls (the
base layers', LoRA's, attention) and views. The step runs at T and at 2T tokens and the difference per token is
reported, so what a step moves once whatever its length (bitsandbytes' dequantization and its absmax arithmetic,
the LoRA weights' casts: per weight, not per token) drops out.

Variants (every layer unchecked, LoRA r=16 on the 7 linears with dropout 0.05, NF4 base, bf16 autocast):
  peft         lean_activations off: transformers' norm and MLP, peft's LoRA forward
  lean         lean_activations on, eager math
  lean+fused   lean_activations with fused_kernels: each compiled kernel counted as ONE pass (its inputs read once,
               its outputs written once), which is what torch.compile's fusion does for these pointwise and
               row-reduction kernels; the kernels run eagerly here, so only this count is modelled, not measured.
Caveat: the CPU's attention, RoPE and dropout run the same aten operations as CUDA's. Use the count to compare
variants, not as a GPU time.

`--kernels` also times each lean kernel on the CPU (one thread, T tokens), eager against compiled (torch.compile's
C++ backend): a check that compilation fuses the work, not a GPU number.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import perf  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

WIDTHS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2),
}
NOT_COUNTED = {
    # matmuls and attention (compute-bound or counted elsewhere), dequantization (per weight)
    "mm", "addmm", "bmm", "gemm_4bit", "linear", "matmul", "dequantize_4bit", "dequantize_blockwise",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    # views and allocations move no data
    "view", "_unsafe_view", "detach", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "permute",
    "alias", "as_strided", "split", "split_with_sizes", "unbind", "_reshape_alias", "empty", "empty_like", "new_empty",
    "lift_fresh", "_local_scalar_dense", "is_same_size", "empty_strided",
}


def nbytes(tree) -> int:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class Traffic(TorchDispatchMode):
    """Bytes in and out of each counted operation while `on`, by operation name (kernels as 'fused:<name>')."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.on = False
        self.inside_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if self.on and not self.inside_kernel and name not in NOT_COUNTED:
            self.bytes[name] += nbytes((args, kwargs)) + nbytes(out)
        return out


def one_pass_kernels(traffic: Traffic):
    """The lean kernels, each run eagerly but counted as one fused pass over its inputs and outputs."""
    from worker.training import lean_activations

    def counted(name):
        eager = getattr(lean_activations.EAGER, name)

        def kernel(*args):
            traffic.inside_kernel = True
            try:
                out = eager(*args)
            finally:
                traffic.inside_kernel = False
            if traffic.on:
                traffic.bytes[f"fused:{name}"] += nbytes(args) + nbytes(out)
            return out

        return kernel

    return lean_activations.Kernels(*(counted(f.name) for f in dataclasses.fields(lean_activations.Kernels)))


def count(widths: dict, variant: str, tokens: int) -> dict:
    from transformers import LlamaConfig

    from bench.random_base import build_random_base
    from worker.training import lean_activations
    from worker.training.data import collate_packed
    from worker.training.model import add_adapters, decide_for_device, decoder_layers
    from worker.training.objectives.sft import forward_loss

    config = LlamaConfig(vocab_size=512, num_hidden_layers=2, max_position_embeddings=max(4096, tokens), **widths)
    cfg = perf.engine_config(gradient_checkpointing="off", lean_activations=variant != "peft", fused_kernels="off")
    device = torch.device("cpu")
    base = build_random_base(config, cfg, device, seed=0)
    perf.set_attention(base, decide_for_device(cfg, device).attn_implementation)
    model = add_adapters(base, cfg, device, ("off", "off")).model
    model.train()
    traffic = Traffic()
    if variant == "lean+fused":
        kernels = one_pass_kernels(traffic)
        for module in model.modules():
            if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) in (lean_activations.rmsnorm_forward, lean_activations.mlp_forward):
                module.__dict__["lean_kernels"] = kernels
    layer = decoder_layers(model)[1]
    layer.register_forward_pre_hook(lambda *a: setattr(traffic, "on", True))
    layer.register_forward_hook(lambda *a: setattr(traffic, "on", False))
    layer.register_full_backward_pre_hook(lambda *a: setattr(traffic, "on", True))
    layer.register_full_backward_hook(lambda *a: setattr(traffic, "on", False))
    counts = []
    for n_tokens in (tokens, 2 * tokens):
        batch = collate_packed(perf.random_examples([n_tokens], config.vocab_size, seed=1))
        traffic.bytes = collections.Counter()
        model.zero_grad(set_to_none=True)  # both runs assign the gradients, neither accumulates
        torch.manual_seed(0)
        with traffic:
            loss_sum, n, _ = forward_loss(model, batch, device, torch.bfloat16, True)
            (loss_sum / n).backward()
        counts.append(traffic.bytes)
    per_token = collections.Counter({k: (counts[1][k] - counts[0][k]) / tokens for k in counts[1] | counts[0]})
    return {"bytes_per_token": round(sum(per_token.values())),
            "top": {k: round(v) for k, v in per_token.most_common(12)}}


def kernel_times(widths: dict, tokens: int, repeats: int = 5) -> dict:
    """Milliseconds per call of each lean kernel, eager and compiled, on the CPU with one thread."""
    import time

    from worker.training import lean_activations

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hidden, inter = widths["hidden_size"], widths["intermediate_size"]
        x, grad = (torch.randn(1, tokens, hidden, dtype=torch.bfloat16) for _ in range(2))
        weight = torch.randn(hidden, dtype=torch.bfloat16)
        gate, up, grad_h = (torch.randn(1, tokens, inter, dtype=torch.bfloat16) for _ in range(3))
        _out, rstd = lean_activations.EAGER.rms_forward(x, weight, 1e-5)
        cases = {"rms_forward": (x, weight, 1e-5), "rms_backward": (grad, x, weight, rstd), "normed": (x, weight, rstd),
                 "swiglu": (gate, up), "swiglu_backward": (grad_h, gate, up)}
        times = {}
        for name, args in cases.items():
            row = {}
            for kind, fn in (("eager_ms", getattr(lean_activations.EAGER, name)), ("compiled_ms", getattr(lean_activations.compiled_kernels(), name))):
                fn(*args)  # compiles (once per process) and warms up
                start = time.perf_counter()
                for _ in range(repeats):
                    fn(*args)
                row[kind] = round((time.perf_counter() - start) / repeats * 1000, 2)
            row["compiled"] = name not in lean_activations.fused_fallbacks()
            times[name] = row
        return times
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths (the test suite's run)")
    parser.add_argument("--tokens", type=int, default=256, help="T: the step runs at T and 2T tokens")
    parser.add_argument("--kernels", action="store_true", help="also time each lean kernel, eager vs compiled (CPU)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    shape = "tiny" if args.tiny else "llama3-8b"
    record = {"date": dt.date.today().isoformat(), "card": perf.card(torch.device("cpu")), "versions": perf.versions(),
              "shape": shape, "widths": WIDTHS[shape], "tokens": args.tokens, "results": {}}
    for variant in ("peft", "lean", "lean+fused"):
        record["results"][variant] = count(WIDTHS[shape], variant, args.tokens)
        print(variant, json.dumps(record["results"][variant]), flush=True)
    if args.kernels:
        record["kernel_times"] = kernel_times(WIDTHS[shape], args.tokens)
        print("kernels", json.dumps(record["kernel_times"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    peft = record["results"]["peft"]["bytes_per_token"]
    print(f"\n{shape}, one decoder layer, forward + backward, elementwise bytes per token:")
    for variant, result in record["results"].items():
        print(f"  {variant:12} {result['bytes_per_token']:>10,}  ({result['bytes_per_token'] / peft:.2f} x peft)")
    for name, row in record.get("kernel_times", {}).items():
        print(f"  kernel {name:16} eager {row['eager_ms']:>8} ms  compiled {row['compiled_ms']:>8} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
