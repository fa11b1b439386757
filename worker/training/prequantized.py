"""Pre-quantized bases: a GPTQ or AWQ checkpoint (config.json's `quantization_config`) loaded as it is, with a
kernel that can train LoRA through it.

gptqmodel loads the checkpoint. Its default CPU kernels (`TorchAtenLinear`, `TorchAtenAwqLinear`) repack the
weights for a fused forward-only matmul the first time they run a no-grad forward (an evaluation pass, a
generate), and keep using it in training afterwards: the loss still looks normal but no gradient flows back
through the base layers, so every adapter but the last layer's trains on wrong gradients. Training therefore
names its kernel: on the CPU the plain torch dequantize-and-matmul kernels (`gptq_torch`, `awq_torch`), on a GPU
the Triton ones; whatever gptqmodel loads is checked against `TRAINABLE_KERNELS` before any step runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from contract.base_model import PREQUANTIZED_METHODS
from contract.options import ConfigError, TrainingConfig

# The backend (gptqmodel's BACKEND value) a job trains with, per quantization method and device type.
TRAINING_BACKENDS = {
    ("gptq", "cpu"): "gptq_torch",
    ("awq", "cpu"): "awq_torch",  # transformers calls it "torch_awq"
    ("gptq", "cuda"): "gptq_triton",
    ("awq", "cuda"): "auto_trainable",
}
# The kernel classes whose backward pass is plain autograd through a dequantized weight, in every mode. The
# CPU ones are checked by tests/training/test_prequantized.py; the GPU ones (Triton) are gptqmodel's trainable
# kernels and unverified on this project's CPU-only test machines.
TRAINABLE_KERNELS = frozenset({"TorchLinear", "AwqTorchLinear", "TritonV2Linear", "AwqGEMMTritonLinear", "AwqGEMMLinear"})


def import_gptqmodel() -> Any:
    """gptqmodel, with its CPU worker pool at two threads or more: it sizes the pool at import from
    GPTQMODEL_CPU_WORKERS, whose default is one worker on a 2-core machine, where issue 13 found it needs two."""
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, min(12, ((os.cpu_count() or 1) + 1) // 2)))
    try:
        import gptqmodel
    except ImportError:
        raise ConfigError("pre-quantized (GPTQ/AWQ) bases need the gptqmodel package: pip install '.[gptq]'", param="model") from None
    return gptqmodel


def training_backend(method: str, device_type: str) -> str:
    try:
        return TRAINING_BACKENDS[(method, device_type)]
    except KeyError:
        raise ConfigError(f"training on a {method.upper()} base is not supported on device type {device_type!r}", param="model") from None


def quantization_kernels(model: torch.nn.Module) -> set[str]:
    """The class names of the gptqmodel quantized layers in `model`."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)}


def load_for_training(base_model_dir: str | Path, cfg: TrainingConfig, device: torch.device, dtype: torch.dtype,
                      attn_implementation: str, *, backend: str | None = None) -> Any:
    """Load the pre-quantized base (cfg.quantization 'gptq' or 'awq') with a trainable kernel, frozen and ready
    for `model.add_adapters`. `backend` overrides the kernel choice (tests use it to show what a wrong one does)."""
    if cfg.quantization not in PREQUANTIZED_METHODS:
        raise ValueError(f"not a pre-quantized route: {cfg.quantization!r}")
    gptqmodel = import_gptqmodel()
    chosen = backend or training_backend(cfg.quantization, device.type)
    loaded = gptqmodel.GPTQModel.load(str(base_model_dir), backend=chosen, device=str(device), dtype=dtype)
    model = loaded.model
    model.set_attn_implementation(attn_implementation)
    if device.type == "cpu":
        run_dequantization_eagerly(model)
    kernels = quantization_kernels(model)
    if not kernels:
        raise ConfigError(f"the {cfg.quantization.upper()} base at {str(base_model_dir)!r} loaded without any quantized layer", param="model")
    if backend is None and not kernels <= TRAINABLE_KERNELS:
        raise RuntimeError(f"gptqmodel loaded the kernels {sorted(kernels - TRAINABLE_KERNELS)} for backend {chosen!r}: "
                           "they cannot train LoRA correctly")
    return model


def run_dequantization_eagerly(model: torch.nn.Module) -> int:
    """Undo the torch.compile that gptqmodel wraps around each GPTQ layer's dequantization on load: it compiles once
    per layer and per train/eval mode, which costs seconds per layer on the CPU (minutes for a real model) before
    the first steps. Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        if "dequantize_weight" in vars(module):  # the compiled wrapper is set on the instance, over the class's method
            del module.dequantize_weight
            changed += 1
    return changed
