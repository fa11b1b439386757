"""Long context: offloaded checkpoints and the tiled MLP give the plain path's loss and gradients, keep on the device
what the memory estimate counts, and are planned only when the budget needs them; a length that cannot fit is refused."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from contract import device_choices
from contract.data_format import load_examples
from contract.errors import ConfigError
from contract.memory import GIB
from contract.memory import estimate_memory as _estimate_memory
from contract.options import TrainingConfig
from worker.training import lean_activations, long_context
from worker.training.data import collate_packed, tokenize_examples
from worker.training.model import apply_checkpoint_plan, build_model, decoder_layers, read_model_config
from worker.training.objectives.sft import forward_loss
from worker.training.tunables import LOSS_CHUNK_TOKENS

from .test_trainer import write_chat_file

estimate_memory = partial(_estimate_memory, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)


@pytest.fixture
def examples(tmp_path, tokenizer):
    rows = load_examples(write_chat_file(tmp_path / "train.jsonl", 12))
    tokenized, _ = tokenize_examples(tokenizer, rows[:6], max_seq_length=64)
    return tokenized


def loss_and_grads(built, batch, seed=0):
    built.model.train()
    for p in built.model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss, n, _ = forward_loss(built.model, batch, built.device, None, True)
    loss.backward()
    return float(loss.detach()), n, {k: p.grad.clone() for k, p in built.model.named_parameters() if p.requires_grad}


def assert_same(reference, other):
    assert other[1] == reference[1] > 0
    assert other[0] == pytest.approx(reference[0], rel=1e-5)
    assert reference[2].keys() == other[2].keys()
    for name, grad in reference[2].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(other[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("lean", "lengths"), [(True, (1, 3)), (False, (3,))], ids=["lean", "peft"])
def test_offload_and_tiling_equal_the_plain_path(tiny_model_dir, examples, lean, lengths):
    """On the NF4 base, at row lengths of 63 and 168 tokens: offloaded checkpoints (with dropout: the recomputation replays the
    masks), and the MLP in tiles of 16 tokens (no row here is a multiple of 16) without dropout (with it, each tile
    draws its own mask: test_tiled_mlp_replays_each_tiles_dropout_mask), against the plain path of the same model."""
    cfg = TrainingConfig(compute_dtype="fp32", attn_implementation="varlen", gradient_checkpointing="off", lean_activations=lean,
                         lora_dropout=0.1)
    torch.manual_seed(0)
    built = build_model(tiny_model_dir, cfg)
    torch.manual_seed(1)
    for name, param in built.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    base = built.model.get_base_model()
    dropouts = [m for m in built.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 14
    for length in lengths:
        batch = collate_packed(examples[:length])
        assert batch["input_ids"].shape[1] % 16  # 63, 168 tokens
        for p in (0.1, 0.0):
            for m in dropouts:
                m.p = p
            apply_checkpoint_plan(base, ("off", "off"), cfg.lora_r)
            reference = loss_and_grads(built, batch)
            apply_checkpoint_plan(base, ("offload", "offload"), cfg.lora_r)
            long_context.HOST.reset()
            offloaded = loss_and_grads(built, batch)
            assert long_context.HOST.copies == 2 and long_context.HOST.live == 0  # both inputs offloaded, both freed
            assert_same(reference, offloaded)
            if p == 0:
                assert long_context.apply_tiling(built.model, 16) == 2
                assert_same(reference, loss_and_grads(built, batch))
                apply_checkpoint_plan(base, ("off", "off"), cfg.lora_r)
                assert_same(reference, loss_and_grads(built, batch))  # tiled alone
                long_context.apply_tiling(built.model, None)


def test_tiled_mlp_replays_each_tiles_dropout_mask(tiny_model_dir, examples):
    """With dropout each tile draws its own mask; backward replays exactly those: the gradients are autograd's
    through the same tiles computed one after another with the graph kept."""
    cfg = TrainingConfig(compute_dtype="fp32", gradient_checkpointing="off", lean_activations=True, lora_dropout=0.2)
    torch.manual_seed(0)
    built = build_model(tiny_model_dir, cfg)
    mlp = decoder_layers(built.model)[0].mlp
    built.model.train()
    x = torch.randn(1, 23, 64, requires_grad=True)
    grad = torch.randn(1, 23, 64)
    params = [p for p in mlp.parameters() if p.requires_grad]
    for p in params:
        p.data.normal_(0, 0.1)
    torch.manual_seed(5)
    reference = torch.cat([mlp(x[:, s:s + 5]) for s in range(0, 23, 5)], dim=1)
    expected = torch.autograd.grad(reference, [x, *params], grad)
    long_context.apply_tiling(built.model, 5)
    torch.manual_seed(5)
    out = mlp(x)
    torch.rand(3)  # the generator moves on before backward
    got = torch.autograd.grad(out, [x, *params], grad)
    assert torch.equal(out, reference)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert long_context.apply_tiling(built.model, None) == 0 and not long_context.tiled(built.model)
    assert mlp.forward.__func__ is lean_activations.mlp_forward  # untiling gives back the lean forward


def saved_bytes(built, batch, cfg):
    """Bytes autograd keeps per decoder layer in a forward pass (the project's hook-based count: once per storage,
    weights excluded), and the bytes the offloaded layers put in host memory."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    resident = {t.untyped_storage().data_ptr() for t in list(built.model.parameters()) + list(built.model.buffers())}
    seen: list[dict[int, int]] = []
    active: list[int | None] = [None]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if active[0] is not None and ptr not in resident:
            seen[active[0]][ptr] = max(seen[active[0]].get(ptr, 0), t.untyped_storage().nbytes())
        return t

    for index, layer in enumerate(decoder_layers(built.model)):
        seen.append({})
        layer.register_forward_pre_hook(lambda *a, index=index: active.__setitem__(0, index))
        layer.register_forward_hook(lambda *a: active.__setitem__(0, None))
    built.model.train()
    long_context.HOST.reset()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        loss, _, _ = forward_loss(built.model, batch, built.device, torch.bfloat16, True)
    host = long_context.HOST.peak
    loss.backward()
    return [sum(layer.values()) for layer in seen], host


def test_saved_tensor_count_shows_what_stays_on_the_device_and_the_estimate_matches(tiny_model_dir, examples):
    """Offloaded layers keep nothing on the device (their inputs are in host memory: the estimate's host bytes); an
    unchecked layer with its MLP tiled keeps what the estimate's tiled layer counts (bf16, lean, the CPU terms named
    as in test_speedups' count of an unchecked layer)."""
    batch = collate_packed(examples)
    tokens = batch["input_ids"].numel()
    config = read_model_config(tiny_model_dir)
    common = dict(compute_dtype="bf16", lean_activations=True, attn_implementation="varlen")

    cfg = TrainingConfig(gradient_checkpointing="offload", **common)
    built = build_model(tiny_model_dir, cfg, device=torch.device("cpu"))
    per_layer, host = saved_bytes(built, batch, cfg)
    estimate = estimate_memory(config, cfg, tokens_per_micro_batch=tokens)
    assert per_layer == [0, 0]
    assert host == estimate.host_activations == 2 * tokens * config.hidden_size * 2
    assert estimate.layers_offload == 2 and estimate.activations == estimate_memory(
        config, cfg, tokens_per_micro_batch=tokens, layer_modes=["on", "on"]).activations - 2 * tokens * config.hidden_size * 2

    cfg = TrainingConfig(gradient_checkpointing="off", sequence_tiling=True, **common)
    built = build_model(tiny_model_dir, cfg, device=torch.device("cpu"))
    assert long_context.tiled(built.model)
    long_context.apply_tiling(built.model, 9)  # tiles smaller than the row, as they are at long lengths
    per_layer, host = saved_bytes(built, batch, cfg)
    assert host == 0
    off = estimate_memory(config, cfg, tokens_per_micro_batch=tokens, layer_modes=["off"] * 2)
    on = estimate_memory(config, cfg, tokens_per_micro_batch=tokens, layer_modes=["on"] * 2)
    one_layer = (off.activations - on.activations) // 2 + tokens * config.hidden_size * 2
    c, head_dim = 2, config.hidden_size // config.num_attention_heads
    cpu_terms = tokens * (c * config.num_attention_heads * head_dim + 2 * head_dim * c)  # see test_speedups
    assert per_layer[0] == one_layer + cpu_terms, (per_layer, one_layer, cpu_terms)
    untiled = estimate_memory(config, cfg.model_copy(update={"sequence_tiling": False}), tokens_per_micro_batch=tokens,
                              layer_modes=["off"] * 2)
    assert untiled.activations - off.activations == 2 * tokens * (2 * 2 * config.intermediate_size + 3 * 2 * 16 - 2 * config.hidden_size)


def test_the_plan_offloads_and_tiles_only_when_the_budget_needs_it():
    cfg = TrainingConfig(micro_batch_size=1, batch_size=1, max_seq_length=131072)
    planned = cfg.model_copy(update={"lean_activations": True, "compute_dtype": "bf16"})  # as decide_auto plans on a GPU
    tokens = 131072
    plan = partial(device_choices.plan_memory, LLAMA3_8B, planned, loss_chunk_tokens=LOSS_CHUNK_TOKENS, tokens_per_micro_batch=tokens)
    est = partial(estimate_memory, LLAMA3_8B, planned, tokens_per_micro_batch=tokens)
    all_on = est(layer_modes=["on"] * 32, sequence_tiling=False).total
    all_offloaded = est(layer_modes=["offload"] * 32, sequence_tiling=False).total
    least = est(layer_modes=["offload"] * 32, sequence_tiling=True).total
    assert least < all_offloaded < all_on
    assert plan(budget_bytes=all_on) == (("on",) * 32, False)  # fits without: neither offload nor tiling
    modes, tiling = plan(budget_bytes=all_on - 1)
    # two layers offloaded: the first only pays for the prefetched input the backward pass holds
    assert not tiling and modes.count("offload") == 2
    modes, tiling = plan(budget_bytes=all_offloaded)
    assert not tiling and modes == ("offload",) * 32
    modes, tiling = plan(budget_bytes=(all_offloaded + least) // 2)  # offloading alone is not enough: tiling too
    assert tiling and 0 < modes.count("offload") <= 32 and est(layer_modes=modes, sequence_tiling=True).total <= (all_offloaded + least) // 2
    fewer = list(modes)
    fewer[fewer.index("offload")] = "on"
    if "on" in modes:
        assert est(layer_modes=fewer, sequence_tiling=True).total > (all_offloaded + least) // 2  # the fewest offloaded that fit
    # short sequences on a large budget: nothing recomputed at all
    assert device_choices.plan_memory(LLAMA3_8B, planned, tokens_per_micro_batch=2048, budget_bytes=80 * GIB,
                                      loss_chunk_tokens=LOSS_CHUNK_TOKENS) == (("off",) * 32, False)
    # an explicit sequence_tiling=False is never overridden
    never = planned.model_copy(update={"sequence_tiling": False})
    assert device_choices.plan_memory(LLAMA3_8B, never, tokens_per_micro_batch=tokens, budget_bytes=(all_offloaded + least) // 2,
                                      loss_chunk_tokens=LOSS_CHUNK_TOKENS)[1] is False
    # the choices a run records (its "Model loaded" event) say what was chosen
    facts = device_choices.DeviceFacts("cuda", fast_bf16=True, memory_budget_bytes=(all_offloaded + least) // 2)
    choices = device_choices.decide_auto(cfg, facts, model_config=LLAMA3_8B, tokens_per_micro_batch=tokens,
                                         loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    assert choices.to_dict()["sequence_tiling"] is True and "offload" in choices.to_dict()["checkpoint_plan"]


def test_a_length_that_cannot_fit_is_refused_with_the_length_that_would():
    cfg = TrainingConfig(micro_batch_size=1, batch_size=1, max_seq_length=1048576, memory_budget_gb=24)
    with pytest.raises(ConfigError) as caught:
        device_choices.check_fits(LLAMA3_8B, cfg, budget_bytes=24 * GIB, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    error = caught.value
    assert error.param == "max_seq_length" and error.code == "context_too_long"
    longest = error.longest
    assert 131072 <= longest < 1048576 and f"{longest:,}" in str(error)
    fits = cfg.model_copy(update={"max_seq_length": longest})
    device_choices.check_fits(LLAMA3_8B, fits, budget_bytes=24 * GIB, loss_chunk_tokens=LOSS_CHUNK_TOKENS)  # no error
    # a job on the GPU is refused before its model is loaded
    facts = device_choices.DeviceFacts("cuda", fast_bf16=True, memory_budget_bytes=24 * GIB)
    with pytest.raises(ConfigError, match="max_seq_length"):
        device_choices.decide_auto(cfg.model_copy(update={"memory_budget_gb": None}), facts, model_config=LLAMA3_8B,
                                   tokens_per_micro_batch=1048576, loss_chunk_tokens=LOSS_CHUNK_TOKENS)


def test_nothing_quadratic_in_the_sequence_is_made(tiny_model_dir, tokenizer, tmp_path):
    """A packed row of 40 examples with varlen attention: no tensor the model computes, forward or backward, is
    [tokens x tokens] (no dense mask, no scores over the row; RoPE's tables and the position ids are [tokens x d]), and
    none is [tokens x vocab] (the fused loss: one chunk of logits at a time). The same row with sdpa does build the
    dense mask: what the count would catch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rows = load_examples(write_chat_file(tmp_path / "long.jsonl", 40))
    tokenized, _ = tokenize_examples(tokenizer, rows, max_seq_length=64)
    batch = collate_packed(tokenized)
    tokens = batch["input_ids"].numel()
    vocab = read_model_config(tiny_model_dir).vocab_size
    built = build_model(tiny_model_dir, TrainingConfig(compute_dtype="fp32", gradient_checkpointing="off", attn_implementation="varlen"))
    built.model.train()

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.shapes += [tuple(t.shape) for t in (out if isinstance(out, tuple | list) else (out,)) if isinstance(t, torch.Tensor)]
            return out

    def quadratic(shapes):
        return [shape for shape in shapes if sum(1 for d in shape if d >= tokens) >= 2]

    with Shapes() as seen:
        loss, _, _ = forward_loss(built.model, batch, built.device, None, True)
        loss.backward()
    assert tokens > 2000 and seen.shapes
    assert quadratic(seen.shapes) == []
    assert max(math.prod(shape) for shape in seen.shapes) <= LOSS_CHUNK_TOKENS * vocab
    built.model.get_base_model().set_attn_implementation("sdpa")
    with Shapes() as seen:
        forward_loss(built.model, batch, built.device, None, True)
    assert quadratic(seen.shapes)


def test_the_docs_table_of_lengths_is_the_estimates():
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo / "bench"))
    import context_lengths

    assert context_lengths.table() in (repo / "docs" / "training.md").read_text(), "regenerate it: python bench/context_lengths.py"
