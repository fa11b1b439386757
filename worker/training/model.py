"""Build the model a job trains: the frozen base, quantized on load (bitsandbytes, or hqq), with LoRA adapters.

`build_model` is the one entry point. The base is loaded from a local HF-format directory (no hub is
reachable from our machines) with an explicit `BitsAndBytesConfig`: transformers' own defaults are fp4,
no double quantization and fp32 compute, which is not QLoRA.

We do not call peft's `prepare_model_for_kbit_training`: it upcasts every non-quantized weight
(embeddings, head, norms) to fp32, which costs memory (2 GB on an 8B model with a 128k vocabulary) and
buys nothing here: the norms compute in fp32 internally, and the adapters are kept in fp32 by peft.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from contract.base_model import PREQUANTIZED_METHODS, base_quantization, read_config_json
from contract.device_choices import AutoChoices, DeviceFacts, decide_auto
from contract.memory import LAYER_MODES, SEQUENCE_TILE_TOKENS
from contract.options import ALL_LINEAR, ConfigError, TrainingConfig
from worker.training import attention, lean_activations, long_context
from worker.training.tunables import FREE_MEMORY_BUDGET_SHARE, LOSS_CHUNK_TOKENS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX through oneDNN).

    Measured once per process rather than read from CPU flags: what counts is the kernel torch really runs
    (``ONEDNN_MAX_CPU_ISA`` or a virtual machine can hide an instruction set the flags report). Without native
    support a bf16 matmul is emulated and runs tens of times slower than fp32; with it, it is faster than fp32.
    The test costs a few milliseconds, or about 0.4 s where bf16 is emulated."""
    a32, b32 = torch.randn(128, 512), torch.randn(512, 512)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)

    def seconds(a: torch.Tensor, b: torch.Tensor) -> float:
        start = time.perf_counter()
        a @ b
        return time.perf_counter() - start

    # One thread, so that no try waits for a sibling thread the scheduler has put aside, and the fastest of
    # interleaved tries: other processes on a busy machine only ever add time. 2x of slack for timer noise: the two
    # cases differ by 10x or more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a32 @ b32, a16 @ b16  # warm-up: the first call picks and prepares the kernel
        tries = [(seconds(a16, b16), seconds(a32, b32)) for _ in range(7)]
    finally:
        torch.set_num_threads(threads)
    return min(t16 for t16, _ in tries) < 2 * min(t32 for _, t32 in tries)


def device_facts(device: torch.device, *, bf16: bool = True, budget: bool = True) -> DeviceFacts:
    """What the 'auto' options depend on, measured on `device`: whether it computes bf16 fast (when `bf16`) and, on
    CUDA, the memory budget: a share of the memory free now (when `budget`)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] if budget else None
        return DeviceFacts("cuda", fast_bf16=torch.cuda.is_bf16_supported() if bf16 else None,
                           memory_budget_bytes=int(free * FREE_MEMORY_BUDGET_SHARE) if free is not None else None)
    if device.type == "cpu":
        return DeviceFacts("cpu", fast_bf16=cpu_bf16_is_fast() if bf16 else None)
    return DeviceFacts(device.type)


def decide_for_device(cfg: TrainingConfig, device: torch.device, *, model_config: Any = None, tokens_per_micro_batch: int | None = None,
                      earlier: dict[str, Any] | None = None) -> AutoChoices:
    """Every 'auto' option of `cfg` decided for `device` (contract.device_choices.decide_auto), measuring only the facts
    the decision needs; with `model_config` the checkpointing plan too. `earlier`: a resumed run's checkpoint config."""
    facts = device_facts(device, bf16=cfg.compute_dtype == "auto",
                         budget=model_config is not None and cfg.gradient_checkpointing == "auto" and cfg.memory_budget_gb is None)
    return decide_auto(cfg, facts, model_config=model_config, tokens_per_micro_batch=tokens_per_micro_batch,
                       loss_chunk_tokens=LOSS_CHUNK_TOKENS, earlier=earlier)


def resolve_for_device(cfg: TrainingConfig, device: torch.device, *, earlier: dict[str, Any] | None = None) -> TrainingConfig:
    """`cfg` with its device-dependent 'auto' options (compute_dtype, lean_activations) decided for `device`."""
    return decide_for_device(cfg, device, earlier=earlier).apply(cfg)


def resolve_compute_dtype(requested: str, device: torch.device, *, quantization: str = "4bit") -> str:
    """What compute_dtype `requested` becomes on `device` for a job on a `quantization` base, for code without a
    job config (the inference server, benchmarks)."""
    return decide_for_device(TrainingConfig(compute_dtype=requested, quantization=quantization), device).compute_dtype


def compute_dtype(cfg: TrainingConfig, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype of the job's matmuls ('auto' decided for `device`, default the device a job would use)."""
    return DTYPES[decide_for_device(cfg, device or pick_device()).compute_dtype]


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


def check_runtime(cfg: TrainingConfig, device_type: str) -> None:
    """Device-dependent checks, run before the model is loaded."""
    if cfg.attn_implementation == "flash_attention_2" and device_type != "cuda":
        raise ConfigError("attn_implementation='flash_attention_2' needs a CUDA GPU", param="attn_implementation")
    if cfg.attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attn_implementation='flash_attention_2' needs the flash-attn package", param="attn_implementation")
    if cfg.compute_dtype == "fp32" and cfg.quantization in ("gptq", "awq"):
        raise ConfigError(f"{cfg.quantization.upper()} kernels compute in 16 bits: use compute_dtype 'auto' or 'bf16' "
                          f"(or 'fp16' on a GPU) on a {cfg.quantization.upper()} base", param="compute_dtype")
    if cfg.quantization == "hqq":
        import importlib.util

        if importlib.util.find_spec("hqq") is None:
            raise ConfigError("quantization='hqq' needs the hqq package: install the extra with "
                              "DISABLE_CUDA=1 pip install '.[hqq]' (make venv does)", param="quantization")
    if cfg.compute_dtype == "fp16" and device_type == "cpu":
        raise ConfigError("compute_dtype='fp16' is not supported on the CPU; use 'auto', 'bf16' or 'fp32'", param="compute_dtype")
    if cfg.attn_implementation == "flex_attention" and device_type != "cuda":
        # torch's compiled CPU kernel for it reads past short sequences on AVX2 CPUs: losses vary run to run or are NaN.
        raise ConfigError("attn_implementation='flex_attention' needs a CUDA GPU (its CPU kernel gives wrong results on some CPUs); "
                          "use 'auto', 'varlen' or 'sdpa'", param="attn_implementation")


def selective_checkpoint_policy(lora_r: int):
    """For a 'selective' layer: keep the outputs of the matmuls that are expensive to redo (every base-layer
    matmul and the LoRA A matmuls, whose inner dimension is larger than the rank) and of the attention kernel;
    recompute the rest (norms, RoPE, SwiGLU, dropout, LoRA B, dequantization) in the backward pass.

    A 4-bit base layer's matmul is one bitsandbytes op (``bitsandbytes::gemm_4bit``, dequantize and matmul
    together), not an aten matmul: it is matched by name."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    matmuls = {aten.mm.default: 0, aten.addmm.default: 1, aten.bmm.default: 0}

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in matmuls:
            left = args[matmuls[op]]
            return CheckpointPolicy.MUST_SAVE if left.shape[-1] > lora_r else CheckpointPolicy.PREFER_RECOMPUTE
        name = str(op)
        if "gemm_4bit" in name or "attention" in name or "varlen_attn" in name:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_checkpoint_plan(model: torch.nn.Module, plan: tuple[str, ...], lora_r: int) -> None:
    """Set each decoder layer's checkpointing. transformers checkpoints per decoder layer through the layer's
    ``gradient_checkpointing`` flag and ``_gradient_checkpointing_func``; we set them layer by layer.
    Non-reentrant checkpointing lets gradients reach the adapters without making the inputs require grad; an
    'offload' layer's function is long_context.OffloadedCheckpoint, which takes the adapters as inputs for that."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    layers = decoder_layers(model)
    if len(layers) != len(plan):
        raise ValueError(f"a checkpoint plan for {len(plan)} layers, but the model has {len(layers)} decoder layers")
    if all(mode == "off" for mode in plan):
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    selective = partial(create_selective_checkpoint_contexts, selective_checkpoint_policy(lora_r))
    for layer, mode in zip(layers, plan, strict=True):
        layer.gradient_checkpointing = mode != "off"
        if mode == "selective":
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False, context_fn=selective)
        elif mode == "offload":  # its input kept in host memory (worker/training/long_context.py)
            long_context.apply_offload(layer)


def read_model_config(base_model_dir: str | Path) -> Any:
    """The base's transformers config. Raises ConfigError (param "model") for a directory without a readable
    config.json (contract.base_model.read_config_json, the check the API and the CLI run too); transformers then
    builds the config of its model_type (AutoConfig applies its own fix-ups, which a dict alone would miss)."""
    from transformers import AutoConfig

    read_config_json(base_model_dir)
    return AutoConfig.from_pretrained(Path(base_model_dir))


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

    bitsandbytes repacks a `Linear4bit` weight in place the first time the layer runs in eval mode
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
    checkpoint_plan: tuple[str, ...]  # per decoder layer: 'off', 'selective', 'on' or 'offload'
    trainable_parameters: int
    total_parameters: int
    choices: AutoChoices  # what every 'auto' option became (the plan included)
    not_lean: tuple[str, ...] = ()  # with lean activations on: the modules that were expected to run lean but do not

    @property
    def gradient_checkpointing(self) -> bool:
        return any(mode != "off" for mode in self.checkpoint_plan)

    def plan_summary(self) -> str:
        counts = {mode: self.checkpoint_plan.count(mode) for mode in LAYER_MODES}
        tiling = ", MLP in sequence tiles" if self.choices.sequence_tiling else ""
        return ", ".join(f"{n} {mode}" for mode, n in counts.items() if n) + tiling


def build_model(base_model_dir: str | Path, cfg: TrainingConfig, *, device: torch.device | None = None,
                tokens_per_micro_batch: int | None = None) -> BuiltModel:
    """Load the base by its quantization route, freeze it, and wrap it with fresh LoRA adapters."""
    device = device or pick_device()
    model_config = read_model_config(base_model_dir)
    choices = decide_for_device(cfg, device, model_config=model_config,
                                tokens_per_micro_batch=tokens_per_micro_batch or cfg.max_tokens_per_micro_batch)
    cfg = choices.apply(cfg)
    check_target_modules(model_config, cfg)
    attn = attention.use(choices.attn_implementation)
    check_base_quantization(model_config, cfg)
    model = load_base(base_model_dir, model_config, cfg, device, attn)
    assert choices.checkpoint_plan is not None  # planned: a model config was given
    return add_adapters(model, cfg, device, choices.checkpoint_plan, choices)


def load_base(base_model_dir: str | Path, model_config: Any, cfg: TrainingConfig, device: torch.device, attn: str) -> Any:
    """The job's base on `device`, stored as its quantization route says: bitsandbytes 4-bit/8-bit or 16/32-bit
    (quantized on load by transformers), HQQ (worker/training/hqq.py), or a GPTQ/AWQ pre-quantized base loaded with
    a trainable kernel (worker/training/prequantized.py)."""
    from transformers import AutoModelForCausalLM

    if cfg.quantization in ("gptq", "awq"):
        from worker.training import prequantized

        return prequantized.load_for_training(base_model_dir, cfg, device, compute_dtype(cfg, device), attn)
    if cfg.quantization == "hqq":
        from worker.training import hqq

        return hqq.load_base(base_model_dir, model_config, cfg, device, compute_dtype(cfg, device), attn)
    return AutoModelForCausalLM.from_pretrained(
        base_model_dir,
        quantization_config=quantization_config(cfg),
        dtype=compute_dtype(cfg, device),
        device_map={"": device},
        attn_implementation=attn,
        low_cpu_mem_usage=True,
    )


def check_base_quantization(model_config: Any, cfg: TrainingConfig) -> str | None:
    """The method the base (its config, as read_model_config gives it) is pre-quantized with (None: a float base),
    checked against cfg.quantization: a job's quantization is decided from the base when it is created
    (contract.prequantized.decide_quantization)."""
    from contract.prequantized import QUANTIZE_HINT

    method = base_quantization(model_config)
    if method is not None and cfg.quantization != method:
        raise ConfigError(f"the base model is pre-quantized with {method.upper()}: train it with quantization={method!r}, "
                          f"not {cfg.quantization!r}", param="quantization")
    if method is None and cfg.quantization in PREQUANTIZED_METHODS:
        raise ConfigError(f"quantization={cfg.quantization!r} needs a base pre-quantized with {cfg.quantization.upper()}; "
                          + QUANTIZE_HINT.format(method=cfg.quantization), param="quantization")
    return method


def lora_targets(model: Any, cfg: TrainingConfig) -> list[str] | str:
    """cfg.target_modules, with 'all-linear' spelled out on the HQQ and GPTQ/AWQ routes as the names of the quantized
    layers and any other linear layer but the output head: peft's 'all-linear' finds only torch and bitsandbytes
    linear layers."""
    if cfg.target_modules != ALL_LINEAR or cfg.quantization not in ("hqq", "gptq", "awq"):
        return cfg.target_modules
    if cfg.quantization == "hqq":
        from hqq.core.quantize import HQQLinear as QuantizedLinear
    else:
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear as QuantizedLinear
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, QuantizedLinear | torch.nn.Linear) and m is not head})


def add_adapters(model: Any, cfg: TrainingConfig, device: torch.device, plan: tuple[str, ...],
                 choices: AutoChoices | None = None) -> BuiltModel:
    """Freeze a loaded base, set its checkpointing plan, and wrap it with fresh LoRA adapters (lean activations and
    fused kernels as `choices` say, decided for `device` when not given)."""
    choices = replace(choices or decide_for_device(cfg, device), checkpoint_plan=tuple(plan))
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if getattr(model, "use_kernels", False):
        # transformers (with the `kernels` package, a dependency since 5.2x) swaps the norms' forwards for Hub
        # kernels at load and again on every .train()/.eval(), which would silently undo lean.apply below.
        model.use_kernels = False  # back to torch's forwards, and no re-kernelizing
    for param in model.parameters():
        param.requires_grad_(False)
    apply_checkpoint_plan(model, plan, cfg.lora_r)

    if device.type == "cpu":
        disable_cpu_inference_repacking(model)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(model, cfg),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    lean_activations.apply(peft_model, choices.lean_activations, choices.fused_kernels)
    long_context.apply_tiling(peft_model, SEQUENCE_TILE_TOKENS if choices.sequence_tiling else None)  # wraps the lean MLP
    trainable, total = peft_model.get_nb_trainable_parameters()
    not_lean = tuple(lean_activations.not_lean(peft_model)) if choices.lean_activations else ()
    return BuiltModel(peft_model, device, tuple(plan), trainable, total, choices, not_lean)
