"""A base model with random weights, built one decoder layer at a time, for benchmarks of large shapes.

A Llama-3-70B base in bf16 is 140 GB: it cannot exist whole on one GPU, so `from_pretrained`-style
"build in 16-bit, then quantize" is impossible there. `build_random_base` creates the architecture on the
meta device (no memory), then materialises it piece by piece on the target device: embeddings, norms,
rotary buffers and head in the compute dtype, then each decoder layer in the compute dtype, randomly
initialised, with its linear layers quantized to 4-bit before the next layer exists. At most one layer is
ever held in 16-bit.

The result is dressed like what `AutoModelForCausalLM.from_pretrained(..., quantization_config=...)`
returns for the same `BitsAndBytesConfig` (model.quantization_config builds it), so that peft wraps it with
its bnb 4-bit LoRA layers and the trainer cannot tell the difference: bitsandbytes `Linear4bit` layers,
`is_loaded_in_4bit`, `is_quantized`, `quantization_method`, `hf_quantizer`, `config.quantization_config`,
the head left unquantized, tied embeddings still tied. A benchmark hands it to `model.add_adapters`, as
`build_model` does with a loaded base.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from contract.options import ConfigError, TrainingConfig
from worker.training import attention
from worker.training.model import compute_dtype, decide_for_device, decoder_layers, disable_cpu_inference_repacking, quantization_config

# bitsandbytes' (and transformers') default; Params4bit would pick it too, but the size of the absmax
# statistics depends on it, so the memory a benchmark measures should not hinge on a library default.
BLOCKSIZE = 64


def build_random_base(model_config: Any, cfg: TrainingConfig, device: torch.device, *, seed: int = 0) -> torch.nn.Module:
    """A causal LM (the `AutoModelForCausalLM.from_config(model_config)` architecture) with random weights,
    built on `device` layer by layer.

    The skeleton is created on the meta device; embeddings, norms and head are materialised in the compute
    dtype; each decoder layer is materialised in the compute dtype and initialised by the model's own
    `_init_weights` (normal(0, initializer_range) for linear and embedding weights, ones for norms, zeros for
    biases), and with quantization '4bit' every `nn.Linear` inside it is replaced right away by a bitsandbytes
    `Linear4bit` holding the quantized weight, before the next layer is materialised. With quantization
    'none' the layers stay in the compute dtype; '8bit' is refused (ConfigError, param 'quantization').

    The same seed gives the same weights whatever `cfg.quantization` is; the caller's RNG state is left
    untouched. Returns the model in eval mode with every parameter frozen and `config.use_cache` False."""
    from transformers import AutoModelForCausalLM

    if cfg.quantization == "8bit":
        raise ConfigError("a random base can be built with quantization '4bit' or 'none', not '8bit'", param="quantization")
    attn = attention.use(decide_for_device(cfg, device).attn_implementation)
    model_config = copy.deepcopy(model_config)  # from_config writes dtype and attention settings into it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=compute_dtype(cfg, device), attn_implementation=attn)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers (GradientCheckpointingLayer) to build one by one")
    with seeded(device, seed):
        initialise(model, modules_outside(model, layers), device)  # for rotary embeddings this recomputes inv_freq
        for layer in layers:
            initialise(model, layer.modules(), device)
            if cfg.quantization == "4bit":
                quantize_linears(layer, cfg, device)

    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    model.requires_grad_(False)
    if cfg.quantization == "4bit":
        mark_loaded_in_4bit(model, cfg)
        if device.type == "cpu":
            disable_cpu_inference_repacking(model)
    model.eval()  # as from_pretrained leaves it
    return model


def modules_outside(model: torch.nn.Module, layers: list[torch.nn.Module]) -> Iterator[torch.nn.Module]:
    """Every module of `model` that is not a decoder layer nor inside one."""
    skip = {id(layer) for layer in layers}
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in skip:
            continue
        yield module
        stack.extend(reversed(list(module.children())))


def initialise(model: Any, modules: Iterable[torch.nn.Module], device: torch.device) -> None:
    """Materialise `modules` on `device` and initialise them as the model initialises fresh weights (which is
    also how from_pretrained fills what a checkpoint lacks, such as the rotary inv_freq buffers)."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # local: it must not outlive the 16-bit weights it holds
    for module in modules:
        materialise(module, device, done)
        model._init_weights(module)


def materialise(module: torch.nn.Module, device: torch.device, done: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give `module`'s own meta parameters and buffers uninitialised storage on `device`, same dtype.

    `done` maps a meta tensor's id to (that tensor, its replacement), so a parameter shared by two modules
    (a head tied to the embeddings) gets one tensor, not two; it holds the meta tensor so the id stays unique."""
    for name, param in module._parameters.items():
        if param is None or not param.is_meta:
            continue
        if id(param) not in done:
            done[id(param)] = (param, torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=False))
        module._parameters[name] = done[id(param)][1]
    for name, buffer in module._buffers.items():
        if buffer is not None and buffer.is_meta:
            module._buffers[name] = torch.empty_like(buffer, device=device)


def quantize_linears(layer: torch.nn.Module, cfg: TrainingConfig, device: torch.device) -> None:
    """Replace every `nn.Linear` of `layer` by a bitsandbytes `Linear4bit` built the way transformers builds
    it on load (replace_with_bnb_linear + Bnb4bitQuantize), holding the quantized weight; the 16-bit weight
    is freed as soon as its replacement exists."""
    import bitsandbytes as bnb

    names = [name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)]
    for name in names:
        linear = layer.get_submodule(name)
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype(cfg, device),
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
            quant_storage=torch.uint8,
            device="meta",
        )
        # Params4bit quantizes when moved to a device (CUDA or CPU alike: `to` calls `_quantize` while
        # `bnb_quantized` is False); the weight is already on `device`, so this only quantizes.
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            blocksize=BLOCKSIZE,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
            quant_storage=torch.uint8,
            module=quantized,
        ).to(device)
        if linear.bias is not None:
            quantized.bias = linear.bias
        quantized.source_cls = type(linear)  # transformers reads it when dequantizing
        quantized.requires_grad_(False)
        layer.set_submodule(name, quantized)
        del linear


def mark_loaded_in_4bit(model: Any, cfg: TrainingConfig) -> None:
    """Set what `from_pretrained` with a 4-bit BitsAndBytesConfig sets: peft reads `is_loaded_in_4bit` to
    choose its bnb 4-bit LoRA layers, transformers reads `hf_quantizer` (save_pretrained, dequantize) and
    `is_quantized` / `quantization_method`; postprocess_model writes config.quantization_config."""
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config(cfg), pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = quantizer.quantization_config.quant_method
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


@contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the generators that initialisation on `device` draws from, and restore them afterwards."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
