"""Correctness guards for the speed and memory options: each optimized path gives the plain path's loss and
gradients on the same batch (CPU, tiny NF4 model). The GPU bench (bench/perf.py) repeats the loss check."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch

from contract import device_choices, memory
from contract.base_model import linear_shapes
from contract.data_format import load_examples
from contract.device_choices import DeviceFacts, decide_auto
from contract.options import ConfigError, TrainingConfig
from worker.training.data import collate_packed, tokenize_examples
from worker.training.model import build_model, read_model_config
from worker.training.objectives.sft import forward_loss
from worker.training.tunables import LOSS_CHUNK_TOKENS

from .test_trainer import write_chat_file

# The engine's loss chunk, passed as the API and the engine pass it.
estimate_memory = partial(memory.estimate_memory, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
plan_checkpointing = partial(device_choices.plan_checkpointing, loss_chunk_tokens=LOSS_CHUNK_TOKENS)


@pytest.fixture
def examples(tmp_path, tokenizer):
    rows = load_examples(write_chat_file(tmp_path / "train.jsonl", 12))
    tokenized, _ = tokenize_examples(tokenizer, rows[:6], max_seq_length=64)
    assert len({len(e.input_ids) for e in tokenized}) > 1
    return tokenized


def loss_and_grads(model_dir, examples, seed=0, **options):
    """Loss of one packed micro-batch and the LoRA gradients, with lora_B made non-zero so every adapter counts."""
    cfg = TrainingConfig(compute_dtype="fp32", **options)
    torch.manual_seed(0)  # the same LoRA initialisation in every variant
    built = build_model(model_dir, cfg)
    torch.manual_seed(1)
    for name, param in built.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    built.model.train()
    torch.manual_seed(seed)  # the same dropout masks in every variant
    loss_sum, n, correct = forward_loss(built.model, collate_packed(examples), built.device, None, cfg.fused_cross_entropy)
    loss_sum.backward()
    grads = {name: p.grad.clone() for name, p in built.model.named_parameters() if p.requires_grad}
    return float(loss_sum.detach()), n, correct, grads, built


def assert_same(reference, other, rel=1e-4):
    assert other[1] == reference[1] and other[2] == reference[2]
    assert other[0] == pytest.approx(reference[0], rel=rel)
    assert reference[3].keys() == other[3].keys()
    for name, grad in reference[3].items():
        torch.testing.assert_close(other[3][name], grad, rtol=rel * 10, atol=1e-6, msg=name)


PLAIN = dict(gradient_checkpointing="off", attn_implementation="sdpa", fused_cross_entropy=False, lora_dropout=0.1,
             lean_activations=False)


@pytest.mark.parametrize("change", [
    {"lean_activations": True},
    {"lean_activations": True, "gradient_checkpointing": "on"},
    {"lean_activations": True, "fused_kernels": "on", "gradient_checkpointing": "on"},
    {"fused_cross_entropy": True},
    {"attn_implementation": "varlen"},
    {"gradient_checkpointing": "on"},
    {"gradient_checkpointing": "selective"},
    {"gradient_checkpointing": "selective", "attn_implementation": "varlen", "fused_cross_entropy": True},
    {"gradient_checkpointing": "selective", "attn_implementation": "varlen", "fused_cross_entropy": True, "lean_activations": True},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_optimized_path_matches_plain_path(tiny_model_dir, examples, change):
    reference = loss_and_grads(tiny_model_dir, examples, **PLAIN)
    optimized = loss_and_grads(tiny_model_dir, examples, **{**PLAIN, **change})
    assert reference[1] > 0 and any(g.abs().sum() > 0 for g in reference[3].values())
    assert_same(reference, optimized)


@pytest.mark.parametrize("quantization", ["8bit", "none"])
def test_lean_activations_match_peft_on_other_bases(tiny_model_dir, examples, quantization):
    """The lean LoRA branch wraps whatever base layer peft wrapped: LLM.int8 and an unquantized base too."""
    options = {**PLAIN, "quantization": quantization}
    reference = loss_and_grads(tiny_model_dir, examples, **options)
    lean = loss_and_grads(tiny_model_dir, examples, **{**options, "lean_activations": True})
    from peft.tuners.lora import LoraLayer

    from worker.training import lean_activations as lean_module

    lora_layers = [m for m in lean[4].model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == 14 and all(m.forward.__func__ is lean_module.lora_forward for m in lora_layers)
    assert reference[1] > 0
    assert_same(reference, lean)


def test_mixed_checkpoint_plan_matches_plain_path(tiny_model_dir, examples, monkeypatch):
    """One layer of each kind in one model (the tiny model has two layers: selective + on, then off + selective)."""
    from worker.training import model as model_module

    reference = loss_and_grads(tiny_model_dir, examples, **PLAIN)
    for plan in (("selective", "on"), ("off", "selective")):
        decided = model_module.decide_for_device
        monkeypatch.setattr(model_module, "decide_for_device", lambda *a, plan=plan, decided=decided, **k:
                            dataclasses.replace(decided(*a, **k), checkpoint_plan=plan))
        mixed = loss_and_grads(tiny_model_dir, examples, **PLAIN)
        assert mixed[4].checkpoint_plan == plan
        layers = model_module.decoder_layers(mixed[4].model)
        assert [layer.gradient_checkpointing for layer in layers] == [mode != "off" for mode in plan]
        assert_same(reference, mixed)


def test_selective_layers_do_not_recompute_the_base_matmuls(tiny_model_dir, examples):
    """A selective layer keeps the outputs of its 4-bit base matmuls (bitsandbytes' gemm_4bit op) and of the
    large LoRA matmuls: its backward runs no base matmul forward again, where a fully checkpointed layer
    recomputes all of them; both run fewer matmuls than a full recompute."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.base = self.aten = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "gemm_4bit" in str(func):
                self.base += 1
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.aten += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for mode in ("on", "selective", "off"):
        built = loss_and_grads(tiny_model_dir, examples, **{**PLAIN, "gradient_checkpointing": mode})[4]
        loss_sum, *_ = forward_loss(built.model, collate_packed(examples), built.device)
        with CountOps() as counter:
            loss_sum.backward()
        counts[mode] = (counter.base, counter.aten)
    n_linear = 7 * 2  # 7 linears in each of the tiny model's 2 layers
    assert counts["on"][0] == n_linear, counts  # full recomputation runs every base matmul again
    assert counts["selective"][0] == 0 and counts["off"][0] == 0, counts
    assert counts["off"][1] < counts["selective"][1] < counts["on"][1], counts


def test_varlen_needs_packing():
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict({"attn_implementation": "varlen", "packing": False})
    assert err.value.param == "attn_implementation"
    cpu = DeviceFacts("cpu", fast_bf16=False)
    assert decide_auto(TrainingConfig(packing=False), cpu).attn_implementation == "sdpa"
    assert decide_auto(TrainingConfig(), cpu).attn_implementation == "varlen"


def test_memory_budget_only_with_auto():
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict({"gradient_checkpointing": "on", "memory_budget_gb": 10})
    assert err.value.param == "memory_budget_gb"


LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)


def test_plan_is_fastest_that_fits():
    cfg = TrainingConfig()
    tokens = 4096
    total = {mode: estimate_memory(LLAMA3_8B, cfg, tokens_per_micro_batch=tokens, layer_modes=[mode] * 32).total
             for mode in ("off", "selective", "on")}
    # With lean activations an unchecked layer keeps less than a selective one (which keeps every base matmul's
    # output), so 'selective' buys nothing; with peft's layers it sits between 'on' and 'off'.
    assert total["on"] < total["off"] < total["selective"]
    peft = TrainingConfig(lean_activations=False)
    peft_total = {mode: estimate_memory(LLAMA3_8B, peft, tokens_per_micro_batch=tokens, layer_modes=[mode] * 32).total
                  for mode in ("off", "selective", "on")}
    assert peft_total["on"] < peft_total["selective"] < peft_total["off"]
    assert plan_checkpointing(LLAMA3_8B, cfg, tokens_per_micro_batch=tokens, budget_bytes=total["off"]) == ("off",) * 32
    # below every layer on, layers are offloaded (tests/training/test_long_context.py: what the plan does then)
    assert plan_checkpointing(LLAMA3_8B, cfg, tokens_per_micro_batch=tokens, budget_bytes=total["on"]) == ("on",) * 32
    assert "offload" in plan_checkpointing(LLAMA3_8B, cfg, tokens_per_micro_batch=tokens, budget_bytes=total["on"] - 1)
    previous = -1
    for budget in range(total["on"], total["off"], (total["off"] - total["on"]) // 20):
        plan = plan_checkpointing(LLAMA3_8B, cfg, tokens_per_micro_batch=tokens, budget_bytes=budget)
        assert set(plan) <= {"on", "off"}
        assert estimate_memory(LLAMA3_8B, cfg, tokens_per_micro_batch=tokens, layer_modes=plan).total <= budget
        more = list(plan)
        if "on" in more:  # one more layer off would not fit: the plan is the fastest that fits
            more[more.index("on")] = "off"
            assert estimate_memory(LLAMA3_8B, cfg, tokens_per_micro_batch=tokens, layer_modes=more).total > budget
        assert plan.count("off") >= previous, "more memory never gives a slower plan"
        previous = plan.count("off")
    assert 0 < previous < 32


def test_fused_loss_removes_the_logits_from_the_estimate():
    fused = estimate_memory(LLAMA3_8B, TrainingConfig(), tokens_per_micro_batch=4096)
    plain = estimate_memory(LLAMA3_8B, TrainingConfig(fused_cross_entropy=False), tokens_per_micro_batch=4096)
    assert plain.logits == 4096 * 128256 * 12
    assert fused.logits < plain.logits / 4
    assert plain.total - fused.total > 3 * 1024**3


def test_auto_plan_on_cpu_is_off(tiny_model_dir):
    from worker.training.model import decide_for_device

    config = read_model_config(tiny_model_dir)
    plan = decide_for_device(TrainingConfig(), torch.device("cpu"), model_config=config, tokens_per_micro_batch=128).checkpoint_plan
    assert plan == ("off",) * config.num_hidden_layers


def test_estimate_counts_what_the_selective_policy_keeps(tiny_model_dir, examples):
    """memory.selective_saved_bytes_per_token equals the bytes of the op outputs the policy marks to keep,
    counted on a real forward pass (bf16 autocast, LoRA on every linear, varlen attention)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import CheckpointPolicy

    from contract.memory import selective_saved_bytes_per_token
    from worker.training.model import decoder_layers, selective_checkpoint_policy

    cfg = TrainingConfig(gradient_checkpointing="off", compute_dtype="bf16")  # the count is of bf16 bytes; varlen, r=16
    built = build_model(tiny_model_dir, cfg, device=torch.device("cpu"))  # the count names the CPU's kernels
    built.model.train()
    policy = selective_checkpoint_policy(cfg.lora_r)

    class KeptBytes(TorchDispatchMode):
        kept = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if policy(None, func, *args, **(kwargs or {})) == CheckpointPolicy.MUST_SAVE:
                outs = out if isinstance(out, tuple | list) else (out,)
                KeptBytes.kept += sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
            return out

    batch = collate_packed(examples)
    layer = decoder_layers(built.model)[0]
    with KeptBytes():
        # the first decoder layer's forward, through the model: a hook stops the pass after it
        handle = layer.register_forward_hook(lambda *a: (_ for _ in ()).throw(StopForward()))
        try:
            forward_loss(built.model, batch, built.device, torch.bfloat16, True)
        except StopForward:
            pass
        finally:
            handle.remove()
    tokens = batch["input_ids"].numel()
    expected = selective_saved_bytes_per_token(read_model_config(tiny_model_dir), cfg) * tokens
    assert KeptBytes.kept == pytest.approx(expected, rel=0.02), (KeptBytes.kept, expected)


class StopForward(Exception):
    pass


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "peft"])
def test_estimate_counts_what_an_unchecked_layer_saves(tiny_model_dir, examples, lean):
    """The estimate of an 'off' layer (what gradient_checkpointing=auto trades against recomputation) is what
    autograd saves in one decoder layer on a real forward pass with the defaults (bf16 autocast, varlen
    attention, LoRA with dropout on every linear), counted once per storage, weights excluded. The estimate
    models CUDA's kernels; the CPU's differ by terms named below, so the count holds for the one CPU attention
    kernel pinned here (SDPA's flash kernel: another backend, e.g. the math one, keeps the s^2 scores), on every
    ISA. Without lean activations the CPU stores peft's dropout masks in the input dtype (2 bytes) where CUDA
    stores bool (1 byte, what the estimate counts); lean layers keep no mask at all."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from worker.training.model import decoder_layers

    cfg = TrainingConfig(gradient_checkpointing="off", lean_activations=lean, compute_dtype="bf16")  # the count is of bf16 bytes
    built = build_model(tiny_model_dir, cfg, device=torch.device("cpu"))  # the count names the CPU's kernels
    built.model.train()
    resident = {t.untyped_storage().data_ptr() for t in list(built.model.parameters()) + list(built.model.buffers())}
    layer = decoder_layers(built.model)[0]
    # .train() must not give the layers other forwards (transformers' Hub kernels did, undoing lean.apply).
    lean_forwards = {name: "forward" in vars(m) for name, m in layer.named_modules() if name.endswith(("norm", "mlp"))}
    assert lean_forwards == dict.fromkeys(lean_forwards, lean) and len(lean_forwards) == 3, lean_forwards
    seen: dict[int, int] = {}
    active = [False]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if active[0] and ptr not in resident:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    layer.register_forward_pre_hook(lambda *a: active.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: active.__setitem__(0, False))
    batch = collate_packed(examples)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        forward_loss(built.model, batch, built.device, torch.bfloat16, True)
    tokens = batch["input_ids"].numel()
    config = read_model_config(tiny_model_dir)
    kwargs = dict(tokens_per_micro_batch=tokens)
    off = estimate_memory(config, cfg, layer_modes=["off"] * 2, **kwargs)
    on = estimate_memory(config, cfg, layer_modes=["on"] * 2, **kwargs)
    one_layer = (off.activations - on.activations) // 2 + tokens * config.hidden_size * 2
    if not lean:
        cpu_masks = tokens * sum(fan_in for fan_in, _ in linear_shapes(config).values())  # +1 byte per mask element
        assert sum(seen.values()) == pytest.approx(one_layer + cpu_masks, rel=0.02), (sum(seen.values()), one_layer, cpu_masks)
        return
    # Lean: exact with the pinned kernel, once two CPU terms are named. The CPU's per-example attention returns a
    # fresh output tensor (CUDA's varlen kernel returns the one it keeps, which o_proj's LoRA then shares); and
    # RoPE's cos/sin (shared by all layers, counted outside them) are first seen in layer 0. (Layer 0's input norm
    # keeps nothing, its input needing no gradient, but the q/k/v branch then keeps that input and scale itself.)
    c, head_dim = 2, config.hidden_size // config.num_attention_heads
    cpu_terms = tokens * (c * config.num_attention_heads * head_dim + 2 * head_dim * c)
    assert sum(seen.values()) == one_layer + cpu_terms, (sum(seen.values()), one_layer, cpu_terms)
