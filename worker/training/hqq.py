"""quantization='hqq': the base quantized on load by the hqq library (Half-Quadratic Quantization, no calibration data).

transformers' own `HqqConfig` path is not usable with the transformers this service pins, so the base is loaded in
the compute dtype and its decoder linears are replaced by hqq's `HQQLinear` with `AutoHQQHFModel.quantize_model`;
peft then wraps each `HQQLinear` with its HQQ LoRA layer (`peft.tuners.lora.hqq.HqqLoraLinear`).

The forward pass of every `HQQLinear` is set to hqq's PYTORCH backend (`forward_pytorch_backprop`): it dequantizes
the weight for each matmul and has an explicit backward (incoming gradient times the dequantized weight), on the
CPU and on a GPU alike. hqq's other forwards are for inference and are never used here: `prepare_for_inference`'s
torchao/gemlite/marlin/bitblas layers have no backward, and the ATEN int8 forward rounds its input (zero gradient).
tests/training/test_hqq.py checks the LoRA gradients against a float copy, before and after an evaluation pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contract.base_model import linear_shapes
from contract.options import ConfigError, TrainingConfig

# Linear layers hqq leaves in the compute dtype: the output head (hqq's own default).
NOT_QUANTIZED = ("lm_head",)


def check_group_size(model_config: Any, cfg: TrainingConfig) -> None:
    """hqq groups weights along a layer's input: the group size must divide every decoder linear's input width, so
    that no group straddles two output rows (checked on the config, before any weight is read)."""
    try:
        widths = sorted({fan_in for fan_in, _ in linear_shapes(model_config).values()})
    except ValueError:  # an architecture the estimate does not model: hqq itself checks what it quantizes
        return
    bad = [w for w in widths if w % cfg.hqq_group_size]
    if bad:
        raise ConfigError(f"hqq_group_size={cfg.hqq_group_size} does not divide the input width of every linear layer "
                          f"of the base model (widths {widths}); pick a divisor of {min(widths)}", param="hqq_group_size")


def quantize(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Replace the decoder linears of a loaded (unquantized) base by hqq layers of `cfg.hqq_bits` bits, on `device`,
    computing in `dtype`; everything else is moved to `device` in `dtype`. Returns the same model."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    # The backend is a class attribute of HQQLinear (process-wide): set the trainable one before any layer exists.
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    quant_config = BaseQuantizeConfig(nbits=cfg.hqq_bits, group_size=cfg.hqq_group_size, axis=1)
    # hqq casts every module it does not quantize to the compute dtype, buffers included; fp32 buffers (RoPE's inverse
    # frequencies) stay fp32, as transformers loads them on the other routes: in bf16 the rotary phases drift with
    # the position.
    fp32_buffers = {name: buf for name, buf in model.named_buffers() if buf.dtype == torch.float32}
    AutoHQQHFModel.quantize_model(model, quant_config=quant_config, compute_dtype=dtype, device=str(device))
    for name, buf in fp32_buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buf.to(device)
    return model


def load_base(base_model_dir: str | Path, model_config: Any, cfg: TrainingConfig, device: torch.device, dtype: torch.dtype,
              attn_implementation: str) -> torch.nn.Module:
    """Load the base from its directory in `dtype` on the CPU and quantize it layer by layer onto `device`."""
    from transformers import AutoModelForCausalLM

    check_group_size(model_config, cfg)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=dtype, device_map={"": "cpu"},
                                                 attn_implementation=attn_implementation, low_cpu_mem_usage=True)
    return quantize(model, cfg, device, dtype)


def quantized_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the quantized weights and their group constants (W_q, scale, zero) held by the hqq layers."""
    from hqq.core.quantize import HQQLinear

    total = 0
    for module in model.modules():
        if isinstance(module, HQQLinear):
            total += module.W_q.numel() * module.W_q.element_size()
            total += sum(v.numel() * v.element_size() for v in module.meta.values() if torch.is_tensor(v))
    return total
