"""Tests for the memory estimate: hand-computed terms on a small config, the orderings and ratios the
estimate must keep, the Llama-3-8B shape against the published QLoRA numbers, and a torch-free import."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest

from contract import memory
from contract.base_model import LINEAR_NAMES, linear_shapes
from contract.memory import FIXED_OVERHEAD_BYTES, GIB, bits_per_weight, optimizer_state_bytes
from contract.options import TrainingConfig
from worker.training.tunables import LOSS_CHUNK_TOKENS

REPO = Path(__file__).resolve().parents[2]

# The engine's loss chunk, passed as the API and the engine pass it.
estimate_memory = partial(memory.estimate_memory, loss_chunk_tokens=LOSS_CHUNK_TOKENS)

# hidden 64, intermediate 128, 2 layers, vocab 100, 4 heads of 16, 2 kv heads, untied head.
SMALL = {
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}


def small_cfg(**overrides) -> TrainingConfig:
    # 2 x 32 = 64 tokens per micro-batch; flash_attention_2 keeps the attention terms free of masks and s^2.
    # fused_cross_entropy=False: the plain loss path (the fused one has its own test below); lean_activations=False:
    # peft's and transformers' own layers (the lean ones have their own test below).
    values = dict(
        lora_r=8, micro_batch_size=2, batch_size=2, max_seq_length=32, attn_implementation="flash_attention_2",
        fused_cross_entropy=False, lean_activations=False,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def anchor_cfg(**overrides) -> TrainingConfig:
    """The performance-baseline run: r=16 on all 7 linears, 2 x 2048 tokens, paged AdamW 8-bit, NF4 + DQ."""
    values = dict(lora_r=16, micro_batch_size=2, batch_size=2, max_seq_length=2048, optimizer="paged_adamw_8bit",
                  attn_implementation="sdpa", fused_cross_entropy=False, lean_activations=False)
    values.update(overrides)
    return TrainingConfig(**values)


# --- the small config, every term by hand -------------------------------------------------------------


def test_linear_shapes_of_one_layer():
    # q: 4 heads * 16 = 64 wide; k, v: 2 kv heads * 16 = 32 wide.
    assert linear_shapes(SMALL) == {
        "q_proj": (64, 64),
        "k_proj": (64, 32),
        "v_proj": (64, 32),
        "o_proj": (64, 64),
        "gate_proj": (64, 128),
        "up_proj": (64, 128),
        "down_proj": (128, 64),
    }
    assert tuple(linear_shapes(SMALL)) == LINEAR_NAMES


def test_small_config_every_term_by_hand():
    est = estimate_memory(SMALL, small_cfg(), gradient_checkpointing=False)

    # Base: linear weights per layer 64*64 + 2*64*32 + 64*64 + 3*64*128 = 36864; at 4.126953125 bits (NF4 + DQ)
    # that is 36864 * 4.126953125 / 8 = 19017 bytes; 2 layers = 38034. Unquantized in bf16: embeddings
    # 100*64 + untied head 100*64 + 5 RMSNorms (2 per layer + final) * 64 = 13120 params * 2 bytes = 26240.
    assert est.base_weights == 38034 + 26240

    # LoRA r=8, params r*(in+out): q 8*128=1024, k 8*96=768, v 768, o 1024, gate/up/down 8*192=1536 each
    # -> 8192 per layer, 16384 in all; fp32 weights and fp32 grads: 4 bytes each.
    assert est.lora_params == 16384 * 4
    assert est.gradients == 16384 * 4

    # paged AdamW 8-bit: every tensor is below 4096 elements (largest 8*128 = 1024), so both states are fp32:
    # 2 * 4 * 16384. Nothing reaches the 100k elements bitsandbytes pages, so nothing is in unified memory.
    assert est.optimizer_state == 2 * 4 * 16384
    assert est.optimizer_paged is True
    assert est.optimizer_paged_bytes == 0

    # Activations, per token and layer (c = 2 bytes, h = 64, q = 64, kv = 32, i = 128, r = 8, 4 heads):
    norms = 2 * (4 * 64 + 4)  # 520: fp32 upcast + rsqrt, two RMSNorms
    attention = 2 * 64 + 2 * 2 * 32 + 2 * 64 + 4 * 4  # 400: q, k, v, output, fp32 logsumexp per head
    swiglu = 3 * 2 * 128  # 768: silu input, silu output, up output
    lora_h = (2 + 1) * 64 + 2 * 8  # 208: dropout output + bool mask + lora_A output, input width 64
    lora = 5 * lora_h + ((2 + 1) * 64 + 2 * 8) + ((2 + 1) * 128 + 2 * 8)  # q,k,v,gate,up + o (64) + down (128)
    assert lora == 1648
    per_token = norms + attention + swiglu + lora
    assert per_token == 3336
    weight_casts = 8192 * 2  # the bf16 copies of one layer's fp32 LoRA weights that autocast saves
    one_layer = 64 * per_token + weight_casts  # 229888
    final_norm = 64 * (4 * 64 + 4)  # 16640
    rope = 64 * 2 * 16 * 2  # cos and sin, head_dim 16, bf16: 4096
    assert est.activations == 2 * one_layer + final_norm + rope  # 480512

    # Logits: 64 tokens * 100 vocab * (4 log_softmax output + 4 + 4 two fp32 gradients); the loop holds no
    # reference to the bf16 head output at the start of backward.
    assert est.logits == 64 * 100 * 12

    # Overhead: the fixed allowance + the largest base linear dequantized to bf16 (gate/up/down, 8192 * 2).
    assert est.overhead == FIXED_OVERHEAD_BYTES + 8192 * 2
    assert est.tokens_per_micro_batch == 64
    assert est.gradient_checkpointing is False

    expected_total = (
        est.base_weights
        + est.lora_params
        + est.gradients
        + est.optimizer_state
        + est.activations
        + est.logits
        + est.overhead
    )
    assert est.total == expected_total
    assert est.torch_allocated_peak == expected_total  # nothing paged


def test_small_config_lean_activations_by_hand():
    est = estimate_memory(SMALL, small_cfg(lean_activations=True), gradient_checkpointing=False)
    norms = 2 * (2 * 64 + 4)  # 264: each norm keeps its bf16 input and the fp32 rsqrt
    attention = 400  # as without
    swiglu = 2 * 2 * 128  # 512: gate and up; silu is recomputed
    # LoRA: every lora_A output (r=8, bf16); no input: q/k/v's and gate/up's are rebuilt from their norm's input
    # and scale, down_proj's (the SwiGLU output) from gate and up; o_proj's is the attention output, kept by the kernel.
    lora = 7 * 2 * 8  # 112
    one_layer = 64 * (norms + attention + swiglu + lora)  # no saved weight casts: the branch casts again in backward
    final_norm = 64 * (2 * 64 + 4)
    rope = 64 * 2 * 16 * 2
    assert est.activations == 2 * one_layer + final_norm + rope == 177408
    peft = estimate_memory(SMALL, small_cfg(), gradient_checkpointing=False)
    assert est.activations < 0.37 * peft.activations  # about a third, at this shape
    dora = estimate_memory(SMALL, small_cfg(lean_activations=True, use_dora=True), gradient_checkpointing=False)
    dora_peft = estimate_memory(SMALL, small_cfg(use_dora=True), gradient_checkpointing=False)
    assert dora_peft.activations > dora.activations > est.activations  # DoRA keeps peft's LoRA path, lean norms/SwiGLU


def test_small_config_with_checkpointing_by_hand():
    est = estimate_memory(SMALL, small_cfg(), gradient_checkpointing=True)
    stored_inputs = 2 * 64 * 64 * 2  # layers * tokens * hidden * bf16
    one_layer = 64 * 3336 + 8192 * 2  # recomputed in backward, one layer at a time
    assert est.activations == stored_inputs + 64 * (4 * 64 + 4) + 64 * 2 * 16 * 2
    assert est.recompute == one_layer
    assert est.gradient_checkpointing is True
    # the logits peak and the recompute of one layer happen at different times: the total takes the larger
    assert est.logits == 76800 and est.recompute == 229888
    static = est.base_weights + est.lora_params + est.gradients + est.optimizer_state + est.activations + est.overhead
    assert est.total == static + one_layer


def test_dropout_zero_shares_the_saved_inputs():
    with_dropout = estimate_memory(SMALL, small_cfg(lora_dropout=0.05), gradient_checkpointing=False)
    without = estimate_memory(SMALL, small_cfg(lora_dropout=0.0), gradient_checkpointing=False)
    # Per token and layer, LoRA with dropout: 1648 (above). Without: 7 * c*r = 112 for the lora_A outputs,
    # plus each distinct input once: attention-norm output 2*64, MLP-norm output 2*64, SwiGLU product 2*128
    # (o_proj's input is the attention output, already saved by the kernel) = 512. Difference 1648 - 624 = 1024.
    assert with_dropout.activations - without.activations == 2 * 64 * 1024


def test_target_modules_subset_reduces_lora_params():
    full = estimate_memory(SMALL, small_cfg())
    subset = estimate_memory(SMALL, small_cfg(target_modules=["q_proj", "self_attn.v_proj"]))
    # q 8*(64+64) = 1024, v 8*(64+32) = 768 params per layer, 2 layers, fp32.
    assert subset.lora_params == (1024 + 768) * 2 * 4
    assert subset.lora_params < full.lora_params
    assert subset.gradients < full.gradients
    assert subset.recompute < full.recompute  # fewer adapters save fewer tensors in the recomputed layer


def test_unknown_target_module_is_rejected():
    with pytest.raises(ValueError, match="lm_head"):
        estimate_memory(SMALL, small_cfg(target_modules=["q_proj", "lm_head"]))


def test_sdpa_with_packing_repeats_kv_and_keeps_the_mask():
    flash = estimate_memory(SMALL, small_cfg(), gradient_checkpointing=False)
    sdpa = estimate_memory(SMALL, small_cfg(attn_implementation="sdpa"), gradient_checkpointing=False)
    # Packed row of 64 tokens with per-example boundaries: transformers builds a 4-D mask, so k and v are repeated
    # to all 4 heads (2*(64-32)*2 bytes more per token and layer) and SDPA keeps a bf16 bias of 64*64 per layer;
    # the bool mask itself (64*64 bytes) is shared.
    per_layer = 64 * (2 * 2 * (64 - 32)) + 2 * 64 * 64
    assert sdpa.activations - flash.activations == 2 * per_layer + 64 * 64


def test_eager_attention_grows_with_the_square_of_the_row():
    short = estimate_memory(
        SMALL, small_cfg(attn_implementation="eager", max_seq_length=64), gradient_checkpointing=False
    )
    long = estimate_memory(
        SMALL, small_cfg(attn_implementation="eager", max_seq_length=128), gradient_checkpointing=False
    )
    flash_short = estimate_memory(SMALL, small_cfg(max_seq_length=64), gradient_checkpointing=False)
    flash_long = estimate_memory(SMALL, small_cfg(max_seq_length=128), gradient_checkpointing=False)
    # One packed row of 128 then 256 tokens: the s^2 part quadruples while the rest only doubles.
    assert long.activations - short.activations > 3 * (flash_long.activations - flash_short.activations)


def test_eight_bit_base_adds_row_scales():
    est = estimate_memory(SMALL, small_cfg(quantization="8bit"))
    # 1 byte per weight + one fp32 scale per output row (64+32+32+64+128+128+64 = 512 rows) per layer.
    assert est.base_weights == (36864 + 4 * 512) * 2 + 26240


# --- bits per weight and orderings ---------------------------------------------------------------------


def test_bits_per_weight():
    assert round(bits_per_weight("4bit", "nf4", True), 3) == 4.127
    assert bits_per_weight("4bit", "nf4", True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert bits_per_weight("4bit", "nf4", False) == 4.5
    assert bits_per_weight("4bit", "fp4", True) == bits_per_weight("4bit", "nf4", True)
    assert bits_per_weight("8bit", "nf4", False) == 8.0
    assert bits_per_weight("none", compute_dtype="bf16") == 16
    assert bits_per_weight("none", compute_dtype="fp32") == 32
    with pytest.raises(ValueError):
        bits_per_weight("3bit")


def test_base_weights_ordering():
    def base(**overrides) -> int:
        return estimate_memory(LLAMA3_8B, anchor_cfg(**overrides)).base_weights

    double_quant = base()
    no_double_quant = base(double_quant=False)
    eight_bit = base(quantization="8bit")
    unquantized = base(quantization="none")
    assert double_quant < no_double_quant < eight_bit < unquantized


def test_llama3_8b_base_weights_in_range():
    est = estimate_memory(LLAMA3_8B, anchor_cfg())
    # 6.98e9 decoder linear weights * 4.127 / 8 = 3.60e9 bytes + bf16 embeddings and head 2 * 128256 * 4096 * 2
    # = 2.10e9 bytes: 5.70e9 bytes = 5.31 GiB. (The baseline's "GB" are GiB: its script divides by 2**30.)
    assert 4.0 * GIB <= est.base_weights <= 5.5 * GIB
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert est.base_weights == pytest.approx(linear * 4.126953125 / 8 + (2 * 128256 * 4096 + 65 * 4096) * 2, abs=1)


def test_checkpointing_reduces_activations():
    for shape, cfg in ((SMALL, small_cfg()), (LLAMA3_8B, anchor_cfg())):
        on = estimate_memory(shape, cfg, gradient_checkpointing=True)
        off = estimate_memory(shape, cfg, gradient_checkpointing=False)
        assert on.activations < off.activations
        assert on.logits == off.logits and on.base_weights == off.base_weights
    # On the 8B shape the saving is large: 1 layer of 32 kept in full plus the 32 layer inputs.
    on = estimate_memory(LLAMA3_8B, anchor_cfg(), gradient_checkpointing=True)
    off = estimate_memory(LLAMA3_8B, anchor_cfg(), gradient_checkpointing=False)
    assert on.activations < off.activations / 8


def test_gradient_checkpointing_setting_is_resolved_from_the_config():
    assert estimate_memory(SMALL, small_cfg(gradient_checkpointing="on")).gradient_checkpointing is True
    assert estimate_memory(SMALL, small_cfg(gradient_checkpointing="off")).gradient_checkpointing is False
    assert estimate_memory(SMALL, small_cfg(gradient_checkpointing="auto")).gradient_checkpointing is True
    forced = estimate_memory(SMALL, small_cfg(gradient_checkpointing="on"), gradient_checkpointing=False)
    assert forced.gradient_checkpointing is False


def test_tokens_per_micro_batch_defaults_to_the_worst_case_and_can_be_given():
    assert estimate_memory(SMALL, small_cfg()).tokens_per_micro_batch == 2 * 32
    fewer = estimate_memory(SMALL, small_cfg(), tokens_per_micro_batch=40)
    assert fewer.tokens_per_micro_batch == 40
    assert fewer.logits == 40 * 100 * 12
    assert fewer.activations < estimate_memory(SMALL, small_cfg()).activations


# --- optimizer -------------------------------------------------------------------------------------------


def test_eight_bit_optimizer_state_is_a_quarter_of_adamw_for_large_tensors():
    big = [1_048_576, 65536, 229376]  # multiples of the 256-value block
    eight, _ = optimizer_state_bytes("adamw_8bit", big)
    full, _ = optimizer_state_bytes("adamw_torch", big)
    # 2 states * (1 byte + 4/256 bytes of absmax) against 2 states * 4 bytes: 0.25 + 1/256.
    assert eight / full == pytest.approx(0.25 + 1 / 256)
    # Below bitsandbytes' min_8bit_size (4096 elements) the 8-bit optimizer keeps fp32 state.
    assert optimizer_state_bytes("adamw_8bit", [4095]) == optimizer_state_bytes("adamw_torch", [4095])
    assert optimizer_state_bytes("adamw_8bit", [4096])[0] == 2 * 4096 + 2 * 4 * 16

    on_8b_8bit = estimate_memory(LLAMA3_8B, anchor_cfg(optimizer="adamw_8bit")).optimizer_state
    on_8b_torch = estimate_memory(LLAMA3_8B, anchor_cfg(optimizer="adamw_torch")).optimizer_state
    assert on_8b_8bit / on_8b_torch == pytest.approx(0.25, abs=0.01)


def test_paged_optimizer_state_is_excluded_from_torch_allocated_peak():
    paged = estimate_memory(LLAMA3_8B, anchor_cfg(optimizer="paged_adamw_8bit"))
    unpaged = estimate_memory(LLAMA3_8B, anchor_cfg(optimizer="adamw_8bit"))
    assert paged.optimizer_paged and not unpaged.optimizer_paged
    assert paged.total == unpaged.total  # the card holds it either way
    assert unpaged.torch_allocated_peak == unpaged.total
    assert paged.torch_allocated_peak == paged.total - paged.optimizer_paged_bytes
    # Only state buffers of tensors with >= 100k elements are paged: gate/up lora_B (14336*16) and down lora_A
    # (16*14336), 3 per layer, 2 states of 1 byte each. The rest (and every absmax) is ordinary torch memory.
    assert paged.optimizer_paged_bytes == 32 * 3 * 2 * 14336 * 16
    assert 0 < paged.optimizer_paged_bytes < paged.optimizer_state

    paged32 = estimate_memory(LLAMA3_8B, anchor_cfg(optimizer="paged_adamw_32bit"))
    assert paged32.optimizer_paged_bytes == 32 * 3 * 2 * 4 * 14336 * 16


# --- totals, reporting ----------------------------------------------------------------------------------


def test_to_dict_has_fields_totals_and_gib():
    est = estimate_memory(LLAMA3_8B, anchor_cfg())
    values = est.to_dict()
    for name in ("base_weights", "lora_params", "gradients", "optimizer_state", "activations", "logits", "overhead"):
        assert values[name] == getattr(est, name)
        assert values[f"{name}_gib"] == round(getattr(est, name) / GIB, 3)
    assert values["total"] == est.total and values["total_gib"] == round(est.total / GIB, 3)
    assert values["torch_allocated_peak"] == est.torch_allocated_peak
    assert values["optimizer_paged"] is True and values["gradient_checkpointing"] is True
    assert values["tokens_per_micro_batch"] == 4096 and "tokens_per_micro_batch_gib" not in values


def test_model_config_object_and_dict_agree():
    as_object = SimpleNamespace(**SMALL, head_dim=None)  # a PretrainedConfig reads as attributes
    assert estimate_memory(as_object, small_cfg()) == estimate_memory(SMALL, small_cfg())


def test_missing_config_fields_are_reported():
    with pytest.raises(ValueError, match="intermediate_size"):
        estimate_memory({k: v for k, v in SMALL.items() if k != "intermediate_size"}, small_cfg())


def test_import_does_not_pull_in_torch():
    code = "import sys, contract.memory; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_dora_adds_magnitude_vectors_and_activations():
    lora = estimate_memory(SMALL, small_cfg())
    dora = estimate_memory(SMALL, small_cfg(use_dora=True))
    # One trainable magnitude per output row: 64+32+32+64+128+128+64 = 512 per layer, 2 layers, fp32.
    assert dora.lora_params == lora.lora_params + 512 * 2 * 4
    assert dora.activations > lora.activations
    assert dora.overhead > lora.overhead  # the weight-norm computation's full-size transients


def test_small_config_fused_loss_and_selective_layers_by_hand():
    """The two terms the speed options change, by hand: the fused loss holds the gradient of the hidden
    states (64 tokens x 64 x 2 bytes) plus one chunk's logits (64 tokens x 100 x 6 bytes); a selective layer
    keeps its input (64 x 2 bytes per token) and the outputs of the base matmuls (q 64 + k 32 + v 32 + o 64 +
    gate 128 + up 128 + down 64 = 512 wide, bf16), of 7 LoRA A matmuls (8 wide, bf16) and of the attention
    (output 64 wide bf16 + logsumexp fp32 per head)."""
    fused = estimate_memory(SMALL, small_cfg(fused_cross_entropy=True))
    assert fused.logits == 64 * 64 * 2 + 64 * 100 * 6
    plain_on = estimate_memory(SMALL, small_cfg(gradient_checkpointing="on"))
    selective = estimate_memory(SMALL, small_cfg(gradient_checkpointing="selective"))
    per_token = 512 * 2 + 7 * 8 * 2 + 64 * 2 + 4 * 4
    assert selective.activations - plain_on.activations == 2 * 64 * per_token
    assert (selective.layers_selective, selective.layers_on, selective.recompute) == (2, 0, plain_on.recompute)
    mixed = estimate_memory(SMALL, small_cfg(), layer_modes=["on", "off"])
    off = estimate_memory(SMALL, small_cfg(gradient_checkpointing="off"))
    one_layer = (off.activations - plain_on.activations + 2 * 64 * 64 * 2) // 2  # what an unchecked layer keeps
    assert mixed.activations == plain_on.activations - 64 * 64 * 2 + one_layer


def test_a_data_parallel_rank_holds_one_gpus_memory_and_an_all_reduce_buffer():
    one = estimate_memory(SMALL, small_cfg(), gradient_checkpointing=False)
    rank = estimate_memory(SMALL, small_cfg(), gradient_checkpointing=False, world_size=2)
    # The whole model, its LoRA state and a rank's micro-batch (as large as one GPU's) on every rank.
    for name in ("base_weights", "lora_params", "gradients", "optimizer_state", "activations", "logits"):
        assert getattr(rank, name) == getattr(one, name), name
    assert rank.communication == one.gradients == 16384 * 4 and not rank.sharded and rank.gathered_layers == 0
    # The flat buffer lives after the backward pass, when the activations are freed: the peak is the larger of the two.
    assert rank.total == one.total
    assert rank.to_dict()["world_size"] == 2 and "world_size_gib" not in rank.to_dict()


def test_a_sharded_rank_holds_its_share_the_replicated_quantization_state_and_two_gathered_layers():
    one = estimate_memory(SMALL, small_cfg(), gradient_checkpointing=False)
    rank = estimate_memory(SMALL, small_cfg(), gradient_checkpointing=False, world_size=2, sharded=True)
    # Per layer 36864 weights: 18432 bytes packed at 4 bits; the state (absmax, code tables) is 0.126953125 bits per
    # weight, 585 bytes a layer (1170 for 2 layers, replicated). Packed weights and the bf16 embeddings, head and
    # norms (26240 bytes) are halved.
    assert rank.base_weights == 2 * 18432 // 2 + 1170 + 26240 // 2
    assert one.base_weights == 2 * 18432 + 1170 + 26240
    assert (rank.lora_params, rank.gradients, rank.optimizer_state) == (16384 * 4 // 2, 16384 * 4 // 2, 2 * 4 * 16384 // 2)
    # Two layers gathered whole: their packed base weights and their fp32 LoRA weights (8192 a layer).
    assert rank.gathered_layers == 2 * 18432 + 2 * 4 * 8192
    assert rank.activations == one.activations and rank.communication == 0
    assert rank.total == (rank.base_weights + rank.lora_params + rank.gradients + rank.optimizer_state + rank.activations
                          + rank.logits + rank.gathered_layers + rank.overhead)
    assert rank.total < one.total


def test_only_4bit_and_unquantized_bases_can_be_sharded():
    with pytest.raises(ValueError, match="cannot be sharded"):
        estimate_memory(SMALL, small_cfg(quantization="8bit", quant_type="nf4"), world_size=2, sharded=True)
    assert estimate_memory(SMALL, small_cfg(quantization="none"), world_size=4, sharded=True).world_size == 4


def test_the_checkpointing_plan_fits_one_ranks_estimate():
    from contract.device_choices import plan_checkpointing

    cfg = small_cfg()
    budget = estimate_memory(SMALL, cfg, gradient_checkpointing=False, world_size=2).total
    assert plan_checkpointing(SMALL, cfg, tokens_per_micro_batch=64, budget_bytes=budget, loss_chunk_tokens=LOSS_CHUNK_TOKENS,
                              world_size=2) == ("off", "off")
    assert plan_checkpointing(SMALL, cfg, tokens_per_micro_batch=64, budget_bytes=budget - 1, loss_chunk_tokens=LOSS_CHUNK_TOKENS,
                              world_size=2) != ("off", "off")
