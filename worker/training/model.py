"""Build the model a job trains: the frozen base, quantized on load by bitsandbytes, with LoRA adapters.

`build_model` is the one entry point. The base is loaded from a local HF-format directory (no hub is
reachable from our machines) with an explicit `BitsAndBytesConfig`: transformers' own defaults are fp4,
no double quantization and fp32 compute, which is not QLoRA.

We do not call peft's `prepare_model_for_kbit_training`: it upcasts every non-quantized weight
(embeddings, head, norms) to fp32, which costs memory (2 GB on an 8B model with a 128k vocabulary) and
buys nothing here: the norms compute in fp32 internally, and the adapters are kept in fp32 by peft.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.training.config import ALL_LINEAR, ConfigError, TrainingConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(cfg: TrainingConfig) -> torch.dtype:
    return DTYPES[cfg.compute_dtype]


def quantization_config(cfg: TrainingConfig) -> Any:
    """The BitsAndBytesConfig for the job, with every 4-bit setting explicit, or None for plain LoRA."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(cfg),
            bnb_4bit_quant_storage=torch.uint8,
        )
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def pick_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_gradient_checkpointing(cfg: TrainingConfig, model_config: Any, device: torch.device, tokens_per_micro_batch: int) -> bool:
    """'auto' turns checkpointing on only when the job would not fit the GPU without it; on the CPU
    memory is rarely the limit and recomputation costs a third more time, so it stays off there."""
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing == "on"
    if device.type != "cuda":
        return False
    from worker.training.memory import estimate_memory, fits

    free, _total = torch.cuda.mem_get_info(device)
    try:
        estimate = estimate_memory(model_config, cfg, tokens_per_micro_batch=tokens_per_micro_batch, gradient_checkpointing=False)
    except ValueError:  # an architecture the estimate does not model: checkpointing is the safe choice
        return True
    # The weights are already on the card when this runs only if the caller loaded them first; we ask
    # before loading, so compare the whole estimate with what is free now.
    return not fits(estimate, free)


def read_model_config(base_model_dir: str | Path) -> Any:
    from transformers import AutoConfig

    path = Path(base_model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"base model directory {str(path)!r} has no config.json", param="model", code="model_not_found")
    return AutoConfig.from_pretrained(path)


def check_target_modules(model_config: Any, cfg: TrainingConfig) -> None:
    """Every listed target module must exist, checked on a weightless (meta-device) copy of the architecture
    so that a typo fails in milliseconds, before gigabytes of weights are read."""
    if cfg.target_modules == ALL_LINEAR:
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    names = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules()} | {name for name, _ in skeleton.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ConfigError(f"target_modules {missing} match no module of the base model", param="target_modules")


def disable_cpu_inference_repacking(model: torch.nn.Module) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for inference on AVX512-BF16 CPUs.

    bitsandbytes 0.50 repacks a `Linear4bit` weight in place the first time the layer runs in eval mode
    on such a CPU, and from then on every forward pass, training ones too, goes through `gemv_4bit`, which
    has no autograd kernel: after the first evaluation, gradients stop flowing back through the frozen
    base and the adapters of earlier layers train on wrong gradients (only a warning says so). We evaluate
    during training, so the repacking must never happen. Returns the number of layers changed."""
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


@dataclass
class BuiltModel:
    model: Any  # peft.PeftModel
    device: torch.device
    gradient_checkpointing: bool
    trainable_parameters: int
    total_parameters: int


def build_model(base_model_dir: str | Path, cfg: TrainingConfig, *, device: torch.device | None = None,
                tokens_per_micro_batch: int | None = None) -> BuiltModel:
    """Load the base quantized on load, freeze it, and wrap it with fresh LoRA adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    model_config = read_model_config(base_model_dir)
    check_target_modules(model_config, cfg)
    use_gc = resolve_gradient_checkpointing(
        cfg, model_config, device, tokens_per_micro_batch or cfg.micro_batch_size * cfg.max_seq_length
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_model_dir,
        quantization_config=quantization_config(cfg),
        dtype=compute_dtype(cfg),
        device_map={"": device},
        attn_implementation=cfg.attn_implementation,
        low_cpu_mem_usage=True,
    )
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    for param in model.parameters():
        param.requires_grad_(False)
    if use_gc:
        # Non-reentrant checkpointing lets gradients reach the adapters without making the inputs require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if device.type == "cpu":
        disable_cpu_inference_repacking(model)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    trainable, total = peft_model.get_nb_trainable_parameters()
    return BuiltModel(peft_model, device, use_gc, trainable, total)
