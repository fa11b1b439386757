"""The LoRA gradient check of a quantized base: the adapters' gradients through the quantized kernels against those of
a float model that holds the same weights dequantized and the same adapter values. The reference built here is for
gptqmodel's layers (GPTQ, AWQ); tests/training/test_hqq.py builds its own from hqq's and uses the same measure
(`lora_gradients`, `worst_relative_error`).

Gradients are compared twice: on the model as built, and again after a no-grad evaluation pass (the pass that
puts some of gptqmodel's CPU kernels into a forward-only mode, after which the loss still looks normal but the
gradients of every layer but the last are wrong)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """A gptqmodel quantized linear layer's weight as a float [out, in] tensor, unpacked from its stored codes."""
    from gptqmodel.nn_modules.qlinear import AWQuantLinear, PackableQuantLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    if isinstance(module, AWQuantLinear):
        weight = dequantize_gemm(qweight=module.qweight, qzeros=module.qzeros, scales=module.scales, bits=module.bits,
                                 group_size=module.group_size)
    elif isinstance(module, PackableQuantLinear):
        was_training = module.training
        module.train()  # the training path unpacks from the codes every time (no eval-time cache)
        weight = PackableQuantLinear.dequantize_weight(module)
        module.train(was_training)
    else:
        raise TypeError(f"not a gptqmodel quantized layer: {type(module).__name__}")
    return weight.float().t().contiguous()


def float_reference(base_model_dir: Path, quantized: Any) -> Any:
    """A float32 copy of the peft model `quantized` (built on a pre-quantized base by the engine): every quantized
    layer becomes a plain nn.Linear holding its dequantized weight, every other weight is copied, and the adapters
    get the same values."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model_dir)
    del config.quantization_config
    config.use_cache = False
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    source = quantized.get_base_model()
    reference_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in source.named_modules():
            if isinstance(module, BaseQuantLinear):
                target = reference_modules[name.removesuffix(".base_layer")] if name.endswith(".base_layer") else reference_modules[name]
                target.weight.copy_(dequantized_weight(module))
        plain = {k: v for k, v in source.state_dict().items() if "lora_" not in k}
        for key, value in reference.state_dict().items():
            source_key = key if key in plain else key.replace(".weight", ".base_layer.weight")
            if source_key in plain and plain[source_key].shape == value.shape and plain[source_key].is_floating_point():
                value.copy_(plain[source_key])
    peft_config = quantized.peft_config["default"]
    reference = get_peft_model(reference, peft_config)
    lora = {k: v for k, v in quantized.state_dict().items() if "lora_" in k}
    missing = reference.load_state_dict(lora, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    return reference


def randomize_adapters(model: Any, seed: int = 0) -> None:
    """Non-zero values in every adapter matrix (a fresh LoRA B is zero, which would leave A's gradient zero too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def lora_gradients(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = {name: param.grad.detach().float().clone() for name, param in model.named_parameters() if "lora_" in name}
    model.zero_grad(set_to_none=True)
    return grads


def worst_relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest ||g - g_ref|| / ||g_ref|| over the adapter matrices, and the matrix it belongs to."""
    assert grads.keys() == reference.keys(), (sorted(grads)[:3], sorted(reference)[:3])
    errors = {name: float((grads[name] - reference[name]).norm() / reference[name].norm().clamp_min(1e-12)) for name in grads}
    name = max(errors, key=errors.__getitem__)
    return errors[name], name


@dataclass
class GradientCheck:
    before_eval: float  # worst relative error of the adapters' gradients on the model as built
    before_where: str
    after_eval: float  # the same after one no-grad evaluation pass
    after_where: str

    def passed(self, tolerance: float) -> bool:
        return self.before_eval <= tolerance and self.after_eval <= tolerance


def check_lora_gradients(quantized: Any, reference: Any, batch: dict[str, torch.Tensor], *,
                         autocast_dtype: torch.dtype | None = None) -> GradientCheck:
    """Compare the adapters' gradients of `quantized` (as built, no forward pass run yet) against `reference` on
    `batch` (input_ids and labels): first as built, then after a no-grad evaluation pass. The evaluation pass runs
    both on the model that has computed gradients and on an untouched copy (a kernel may fix its mode on its first
    forward pass, so the pass that comes first matters); the worse of the two counts. `autocast_dtype`: the 16-bit
    dtype the quantized model computes in, as the trainer runs it (the reference always runs in float32)."""
    def autocast() -> Any:
        return torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)

    def evaluation_pass(model: Any) -> None:
        model.eval()
        with torch.no_grad(), autocast():
            model(**batch, use_cache=False)

    def quantized_grads(model: Any) -> dict[str, torch.Tensor]:
        with autocast():
            return lora_gradients(model, batch)

    untouched = copy.deepcopy(quantized)
    expected = lora_gradients(reference, batch)
    before, before_where = worst_relative_error(quantized_grads(quantized), expected)
    evaluation_pass(quantized)
    evaluation_pass(untouched)
    after, after_where = max(worst_relative_error(quantized_grads(quantized), expected),
                             worst_relative_error(quantized_grads(untouched), expected))
    return GradientCheck(before, before_where, after, after_where)
