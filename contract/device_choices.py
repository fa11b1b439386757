"""What each 'auto' option becomes on a device: one function, `decide_auto`, given the device's facts.

The options with an 'auto' value are compute_dtype, attn_implementation, lean_activations, fused_kernels and
gradient_checkpointing (a plan per decoder layer, against memory_budget_gb or the device's budget). Torch-free: the
engine measures the facts (worker/training/model.device_facts) and runs with the choices; the memory estimate
decides for `PLANNED_GPU`; tests decide for any device without having one. What a job records of the choices:
docs/training.md ("What 'auto' becomes").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from contract.base_model import PREQUANTIZED_METHODS, decoder_layer_count
from contract.errors import ConfigError

if TYPE_CHECKING:  # importing the module must not build pydantic models
    from contract.options import TrainingConfig

GIB = 1024**3


@dataclass(frozen=True)
class DeviceFacts:
    """What the 'auto' options depend on, measured by the engine on the device a run uses."""

    type: str  # "cuda" or "cpu"
    # Whether the device computes bf16 fast: a CUDA card's bf16 support, or a CPU's native bf16 (measured). None:
    # not measured, so compute_dtype='auto' cannot be decided (the engine measures it only when it is 'auto').
    fast_bf16: bool | None = None
    # What gradient_checkpointing='auto' plans for when memory_budget_gb is not set (the engine: 85% of the GPU
    # memory free when the run starts). None on the CPU.
    memory_budget_bytes: int | None = None


# The device the memory estimate plans for: a GPU computing bf16 (the estimate counts 16-bit compute for 'auto').
PLANNED_GPU = DeviceFacts("cuda", fast_bf16=True)


@dataclass(frozen=True)
class AutoChoices:
    """Every 'auto' option decided (explicit values as given)."""

    compute_dtype: str  # bf16, fp16 or fp32
    attn_implementation: str
    lean_activations: bool
    fused_kernels: bool
    # Checkpointing per decoder layer ('off', 'selective', 'on' or 'offload'); None where no model config was given.
    checkpoint_plan: tuple[str, ...] | None = None
    memory_budget_gb: float | None = None  # the budget the plan was made for; None where memory was not planned
    sequence_tiling: bool = False  # each layer's MLP runs in sequence tiles (worker/training/long_context.py)

    def apply(self, cfg: TrainingConfig) -> TrainingConfig:
        """`cfg` with compute_dtype and lean_activations as chosen: what a run trains with and its checkpoints save.
        The others stay as given in the config (a resumed run decides them again) and are read from here."""
        return cfg.model_copy(update={"compute_dtype": self.compute_dtype, "lean_activations": self.lean_activations})

    def to_dict(self) -> dict[str, Any]:
        return {"compute_dtype": self.compute_dtype, "attn_implementation": self.attn_implementation,
                "lean_activations": self.lean_activations, "fused_kernels": self.fused_kernels,
                "checkpoint_plan": list(self.checkpoint_plan) if self.checkpoint_plan is not None else None,
                "memory_budget_gb": self.memory_budget_gb, "sequence_tiling": self.sequence_tiling}


def decide_auto(cfg: TrainingConfig, device: DeviceFacts, *, model_config: Any = None, tokens_per_micro_batch: int | None = None,
                loss_chunk_tokens: int | None = None, earlier: Mapping[str, Any] | None = None) -> AutoChoices:
    """Decide every 'auto' option of `cfg` for `device`.

    compute_dtype: `earlier`'s (the config a resumed run's checkpoint saved: a job keeps the dtype it began with);
    on a GPTQ/AWQ base a 16-bit one (gptqmodel's kernels compute in nothing else; AWQ's CUDA kernels take fp16 only);
    else bf16 where the device computes it fast, otherwise fp16 on CUDA and fp32 on the CPU.
    attn_implementation: varlen with packing, else sdpa. lean_activations: on with CUDA (or fused_kernels='on'),
    off on the CPU. fused_kernels: on with CUDA where lean_activations is.
    gradient_checkpointing (needs `model_config`, and `tokens_per_micro_batch` and the engine's `loss_chunk_tokens`
    to plan): off on the CPU, where memory is rarely the limit and recomputation costs time; on CUDA the fastest
    plan whose memory estimate fits memory_budget_gb (else the device's budget), full checkpointing for an
    architecture the estimate does not model."""
    dtype = _compute_dtype(cfg, device, earlier)
    lean = (device.type == "cuda" or cfg.fused_kernels == "on") if cfg.lean_activations == "auto" else bool(cfg.lean_activations)
    fused = (lean and device.type == "cuda") if cfg.fused_kernels == "auto" else cfg.fused_kernels == "on"
    attn = ("varlen" if cfg.packing else "sdpa") if cfg.attn_implementation == "auto" else cfg.attn_implementation
    tiling = cfg.sequence_tiling is True
    choices = AutoChoices(compute_dtype=dtype, attn_implementation=attn, lean_activations=lean, fused_kernels=fused,
                          sequence_tiling=tiling)
    if model_config is None:
        return choices
    layers = decoder_layer_count(model_config)
    if cfg.gradient_checkpointing != "auto":
        return _with_plan(choices, (cfg.gradient_checkpointing,) * layers, tiling)
    if device.type != "cuda":
        return _with_plan(choices, ("off",) * layers, tiling)
    budget = int(cfg.memory_budget_gb * GIB) if cfg.memory_budget_gb is not None else device.memory_budget_bytes
    if budget is None or tokens_per_micro_batch is None or loss_chunk_tokens is None:
        raise ValueError("gradient_checkpointing='auto' on a GPU plans with a memory budget, the tokens per micro-batch and the loss chunk")
    try:
        plan, tiling = plan_memory(model_config, choices.apply(cfg), tokens_per_micro_batch=tokens_per_micro_batch,
                                   budget_bytes=budget, loss_chunk_tokens=loss_chunk_tokens)
    except ValueError:  # an architecture the estimate does not model: full checkpointing is the safe choice
        plan = ("on",) * layers
    else:  # a plan that does not fit is the least memory there is: the job cannot run, refused before its model loads
        check_fits(model_config, choices.apply(cfg), budget_bytes=budget, loss_chunk_tokens=loss_chunk_tokens,
                   tokens_per_micro_batch=tokens_per_micro_batch)
    return _with_plan(choices, plan, tiling, round(budget / GIB, 3))


def _with_plan(choices: AutoChoices, plan: tuple[str, ...], tiling: bool, budget_gb: float | None = None) -> AutoChoices:
    return AutoChoices(choices.compute_dtype, choices.attn_implementation, choices.lean_activations, choices.fused_kernels, plan, budget_gb,
                       tiling)


def _compute_dtype(cfg: TrainingConfig, device: DeviceFacts, earlier: Mapping[str, Any] | None) -> str:
    if cfg.compute_dtype != "auto":
        return cfg.compute_dtype
    if earlier is not None and earlier.get("compute_dtype") in ("bf16", "fp16", "fp32"):
        return earlier["compute_dtype"]
    if cfg.quantization in PREQUANTIZED_METHODS and (device.type == "cpu" or cfg.quantization == "awq"):
        return "bf16" if device.type == "cpu" else "fp16"
    if device.type not in ("cuda", "cpu"):
        return "fp32"
    if device.fast_bf16 is None:
        raise ValueError("compute_dtype='auto' needs to know whether the device computes bf16 fast")
    if device.type == "cuda":
        return "bf16" if device.fast_bf16 else "fp16"
    return "bf16" if device.fast_bf16 else "fp32"


def plan_checkpointing(model_config: Any, cfg: TrainingConfig, *, tokens_per_micro_batch: int, budget_bytes: int,
                       loss_chunk_tokens: int) -> tuple[str, ...]:
    """The checkpointing of each decoder layer that `plan_memory` chooses."""
    return plan_memory(model_config, cfg, tokens_per_micro_batch=tokens_per_micro_batch, budget_bytes=budget_bytes,
                       loss_chunk_tokens=loss_chunk_tokens)[0]


def _candidates(layers: int, tiling: bool | str) -> Iterator[tuple[list[str], bool]]:
    """Plans from the fastest to the least memory: as many layers 'off' as possible, the rest 'on'; then every
    layer checkpointed, 1, 2, ... of them offloaded (a copy to host memory each, overlapped with compute); then the
    same with the MLP in sequence tiles (one more MLP forward per layer) where sequence_tiling is 'auto'. An explicit
    sequence_tiling applies to every plan."""
    fixed = tiling if isinstance(tiling, bool) else None
    for n_off in range(layers, -1, -1):
        yield ["on"] * (layers - n_off) + ["off"] * n_off, bool(fixed)
    for n_offload in range(1, layers + 1):
        yield ["offload"] * n_offload + ["on"] * (layers - n_offload), bool(fixed)
    if fixed is None:
        for n_offload in range(0, layers + 1):
            yield ["offload"] * n_offload + ["on"] * (layers - n_offload), True


def plan_memory(model_config: Any, cfg: TrainingConfig, *, tokens_per_micro_batch: int, budget_bytes: int,
                loss_chunk_tokens: int) -> tuple[tuple[str, ...], bool]:
    """The fastest plan whose device estimate fits ``budget_bytes`` (`_candidates` in order): the checkpointing of
    each decoder layer and whether the MLPs run in sequence tiles. Offloading and tiling are chosen only when no plan
    without them fits. When nothing fits, the plan with the least memory (`check_fits` refuses such a job).
    'selective' layers are not planned: unmeasured on a GPU since their policy was fixed (docs/performance.md)."""
    from contract.memory import estimate_memory  # here: the estimate decides its own 'auto' options with decide_auto

    layers = decoder_layer_count(model_config)
    last: tuple[list[str], bool] = (["on"] * layers, False)
    for modes, tiling in _candidates(layers, cfg.sequence_tiling):
        estimate = estimate_memory(model_config, cfg, tokens_per_micro_batch=tokens_per_micro_batch, layer_modes=modes,
                                   loss_chunk_tokens=loss_chunk_tokens, sequence_tiling=tiling)
        if estimate.total <= budget_bytes:
            return tuple(modes), tiling
        last = (modes, tiling)
    return tuple(last[0]), last[1]


class ContextTooLong(ConfigError):
    """A job whose tokens per pass cannot fit its memory budget with the least-memory plan; `longest`: the longest
    value of `param` (max_seq_length, or micro_batch_tokens where set) that fits, 0 where none does."""

    def __init__(self, message: str, param: str, longest: int):
        super().__init__(message, param=param, code="context_too_long")
        self.longest = longest


def least_memory_estimate(model_config: Any, cfg: TrainingConfig, *, tokens_per_micro_batch: int, loss_chunk_tokens: int) -> Any:
    """The estimate of the plan with the least device memory the job's options allow: every layer offloaded and the
    MLPs tiled where gradient_checkpointing and sequence_tiling are 'auto', else as they are set."""
    from contract.memory import estimate_memory

    layers = decoder_layer_count(model_config)
    modes = ["offload"] * layers if cfg.gradient_checkpointing == "auto" else None
    tiling = True if cfg.sequence_tiling == "auto" else bool(cfg.sequence_tiling)
    return estimate_memory(model_config, cfg, tokens_per_micro_batch=tokens_per_micro_batch, layer_modes=modes,
                           loss_chunk_tokens=loss_chunk_tokens, sequence_tiling=tiling)


def longest_fitting_tokens(model_config: Any, cfg: TrainingConfig, *, budget_bytes: int, loss_chunk_tokens: int,
                           limit: int = 1 << 24) -> int:
    """The most tokens per forward/backward pass whose least-memory estimate fits `budget_bytes` (0: not even 16).
    The estimate grows with the tokens, so a binary search finds it."""
    def fits(tokens: int) -> bool:
        return least_memory_estimate(model_config, cfg, tokens_per_micro_batch=tokens, loss_chunk_tokens=loss_chunk_tokens).total <= budget_bytes

    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def check_fits(model_config: Any, cfg: TrainingConfig, *, budget_bytes: int, loss_chunk_tokens: int,
               tokens_per_micro_batch: int | None = None) -> None:
    """Raise `ContextTooLong` (param max_seq_length, or micro_batch_tokens where set) when the job's longest pass
    (`tokens_per_micro_batch`, default its most: every example at max_seq_length) cannot fit `budget_bytes` with the
    least-memory plan its options allow, naming the longest length that fits (rounded down to a multiple of 256)."""
    per_example = 2 if cfg.method == "dpo" else 1  # a dpo pass holds both answers of each pair
    tokens = tokens_per_micro_batch if tokens_per_micro_batch is not None else cfg.max_tokens_per_micro_batch * per_example
    estimate = least_memory_estimate(model_config, cfg, tokens_per_micro_batch=tokens, loss_chunk_tokens=loss_chunk_tokens)
    if estimate.total <= budget_bytes:
        return
    most = longest_fitting_tokens(model_config, cfg, budget_bytes=budget_bytes, loss_chunk_tokens=loss_chunk_tokens, limit=tokens)
    if cfg.micro_batch_tokens is not None:
        param, value, longest = "micro_batch_tokens", cfg.micro_batch_tokens, most
    else:
        param, value, longest = "max_seq_length", cfg.max_seq_length, most // (cfg.micro_batch_size * per_example)
    if longest >= 512:
        longest -= longest % 256
    need, budget = estimate.total / GIB, budget_bytes / GIB
    fits = f"the longest that fits is {longest:,}" if longest >= 16 else "no length fits (the base model alone does not)"
    raise ContextTooLong(f"{param}={value:,} needs an estimated {need:.1f} GiB of GPU memory even with every layer checkpointed "
                         f"and offloaded and the MLPs tiled, more than the memory budget of {budget:.1f} GiB: {fits}",
                         param, longest)
