"""The memory estimate's bits per weight for each quantization route: against the real size of the quantized weights
of a small model where the route can be built here (bitsandbytes 4-bit and 8-bit; hqq in test_hqq.py), and the
arithmetic of a pre-quantized GPTQ/AWQ base read from its config's quantization_config."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from contract import memory
from contract.base_model import linear_shapes, stored_format
from contract.memory import bits_per_weight, prequantized_bits_per_weight
from contract.options import TrainingConfig
from worker.training.tunables import LOSS_CHUNK_TOKENS

# The engine's loss chunk, passed as the API and the engine pass it.
estimate_memory = partial(memory.estimate_memory, loss_chunk_tokens=LOSS_CHUNK_TOKENS)

# One decoder layer, widths large enough that a layer's fixed tables (bitsandbytes' code books) are small beside it.
SHAPE = {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "tie_word_embeddings": True}
LLAMA_8B_GPTQ = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
                 "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}}


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("memory-routes")
    LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16).save_pretrained(path)
    return path


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bnb_linear_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, weights) of the bitsandbytes layers: packed weights, absmax (and the nested absmax), LLM.int8's row
    scales. The code books (16 or 256 floats per layer, whatever the layer's size) are left out."""
    import bitsandbytes as bnb

    total = weights = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            total += _tensor_bytes(module.weight) + _tensor_bytes(state.absmax)
            if state.nested:
                total += _tensor_bytes(state.state2.absmax) + _tensor_bytes(state.offset)
            weights += math.prod(state.shape)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            total += _tensor_bytes(module.weight) + _tensor_bytes(module.weight.SCB)
            weights += module.weight.numel()
    return total, weights


@pytest.mark.parametrize("options", [
    {"quantization": "4bit"},
    {"quantization": "4bit", "quant_type": "fp4", "double_quant": False},
    {"quantization": "8bit"},
], ids=["nf4-dq", "fp4", "int8"])
def test_bits_per_weight_is_the_real_size_of_the_bitsandbytes_weights(small_base, options):
    from transformers import AutoModelForCausalLM

    from worker.training.model import quantization_config

    cfg = TrainingConfig(compute_dtype="fp32", **options)
    model = AutoModelForCausalLM.from_pretrained(small_base, quantization_config=quantization_config(cfg), dtype=torch.float32)
    real, weights = bnb_linear_bytes(model)
    assert weights == sum(i * o for i, o in linear_shapes(SHAPE).values())
    estimate = weights * bits_per_weight(cfg.quantization, cfg.quant_type, cfg.double_quant) / 8
    if cfg.quantization == "8bit":
        estimate += 4 * sum(o for _, o in linear_shapes(SHAPE).values())  # the row scales estimate_memory adds
    assert estimate == pytest.approx(real, rel=0.01)


def test_hqq_bits_per_weight():
    assert bits_per_weight("hqq") == 4 + 32 / 64  # 4-bit + a bf16 scale and zero per group of 64
    assert bits_per_weight("hqq", hqq_bits=3, hqq_group_size=128, compute_dtype="fp32") == pytest.approx(3.2 + 64 / 128)
    with pytest.raises(ValueError):
        bits_per_weight("hqq", hqq_bits=5)
    cfg = TrainingConfig(quantization="hqq", hqq_bits=2, hqq_group_size=32, compute_dtype="bf16")
    linears = sum(i * o for i, o in linear_shapes(SHAPE).values())
    unquantized = 256 * 256 + 3 * 256  # tied embeddings, norms, bf16
    assert estimate_memory(SHAPE, cfg).base_weights == math.ceil(linears * (2 + 32 / 32) / 8) + 2 * unquantized


# --- a pre-quantized base: config.json's quantization_config ------------------------------------------------

def test_base_quantization_reads_the_config():
    assert stored_format(SHAPE) is None
    assert stored_format(LLAMA_8B_GPTQ) == {"method": "gptq", "bits": 4, "group_size": 128}
    awq = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True}}
    assert stored_format(awq) == {"method": "awq", "bits": 4, "group_size": 64}
    assert stored_format({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}) == \
        {"method": "bitsandbytes", "bits": 4, "group_size": None}
    assert stored_format({"quantization_config": "nonsense"}) is None
    assert stored_format({"quantization_config": {"bits": 4}}) is None


def test_prequantized_bits_per_weight_arithmetic():
    # AWQ: 4 bits + per group of 128 and output column an fp16 scale and a packed 4-bit zero.
    assert prequantized_bits_per_weight("awq", 4, 128, 4096, 4096) == 4 + 20 / 128
    # GPTQ adds its int32 group index per input row: 32 bits spread over the row's fan_out weights.
    assert prequantized_bits_per_weight("gptq", 4, 128, 4096, 1024) == 4 + 20 / 128 + 32 / 1024
    # group_size -1: one group per column, the whole input.
    assert prequantized_bits_per_weight("gptq", 8, -1, 2048, 512) == 8 + 24 / 2048 + 32 / 512
    with pytest.raises(ValueError):
        prequantized_bits_per_weight("gptq", 5, 128, 64, 64)
    with pytest.raises(ValueError):
        prequantized_bits_per_weight("exl2", 4, 128, 64, 64)


def test_the_estimate_of_a_gptq_base_counts_its_stored_weights():
    cfg = TrainingConfig(compute_dtype="bf16")
    shapes = linear_shapes(LLAMA_8B_GPTQ)
    per_layer = sum(i * o * (4 + 20 / 128 + 32 / o) / 8 for i, o in shapes.values())
    unquantized = 2 * 128256 * 4096 + (2 * 32 + 1) * 4096  # embeddings + untied head + norms, bf16
    gptq = estimate_memory(LLAMA_8B_GPTQ, cfg, tokens_per_micro_batch=512)
    assert gptq.base_weights == math.ceil(32 * per_layer) + 2 * unquantized
    # The same shape without quantization_config: the job's NF4 route, 4.127 bits per weight.
    plain = estimate_memory({k: v for k, v in LLAMA_8B_GPTQ.items() if k != "quantization_config"}, cfg, tokens_per_micro_batch=512)
    assert plain.base_weights < gptq.base_weights and plain.activations == gptq.activations
    with pytest.raises(ValueError, match="bits"):
        estimate_memory({**LLAMA_8B_GPTQ, "quantization_config": {"quant_method": "gptq"}}, cfg)
