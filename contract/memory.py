"""Estimate the peak GPU memory of a training job before any model is loaded (mistake 8 in qlora-facts.md).

Pure arithmetic on the model's config (a transformers ``PretrainedConfig`` or the dict of a Llama-family
``config.json``) and the job's ``TrainingConfig``: no torch import, so the API and the scheduler can call it.

What is modelled, the library facts the formula rests on and its approximations: docs/performance.md
("How the memory estimate is modelled").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from contract.base_model import LINEAR_NAMES, PREQUANTIZED_METHODS, ModelShape, linear_shapes, read_shape, stored_format
from contract.device_choices import PLANNED_GPU, decide_auto

if TYPE_CHECKING:  # the module must import without pydantic's cost, and never torch
    from contract.options import TrainingConfig

# Checkpointing of one decoder layer, from most device memory to least ('offload': as 'on', its input in host memory).
LAYER_MODES = ("off", "selective", "on", "offload")

# With sequence tiling, each decoder layer's MLP runs this many tokens at a time (worker/training/long_context.py):
# an engine setting, kept here (the engine reads it from here) because the estimate and the plan need it too, as they
# do on the API's side. Large enough that a tile's matmuls keep a GPU busy.
SEQUENCE_TILE_TOKENS = 8192

GIB = 1024**3

# A fixed allowance for what torch's allocator counts but the estimate does not model term by term (cuBLAS
# workspaces, input ids, RoPE tables, the allocator's rounding); not calibrated to a measured peak. The CUDA
# context is not included (max_memory_allocated does not count it).
FIXED_OVERHEAD_BYTES = 128 * 1024**2

# bitsandbytes' 8-bit optimizers keep fp32 state for tensors below this many elements (``min_8bit_size``)
# and quantize the rest blockwise with one fp32 absmax per block of 256 values.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIM_BLOCKSIZE = 256
# bitsandbytes' paged optimizers page only state buffers of tensors with at least this many elements; smaller
# buffers (and every absmax) are ordinary torch allocations (``Optimizer8bit.get_state_buffer``).
BNB_PAGED_MIN_NUMEL = 100_000

# The tensor each linear of a decoder layer reads; modules that read the same tensor share one saved copy.
_INPUT_OF = {
    "q_proj": "attn_norm",
    "k_proj": "attn_norm",
    "v_proj": "attn_norm",
    "o_proj": "attn_out",
    "gate_proj": "mlp_norm",
    "up_proj": "mlp_norm",
    "down_proj": "mlp_act",
}

# The fused loss (losses.py) holds this many bytes per logit of a chunk: the fp32 logits (softmax and gradient in
# place) and a bf16/fp16 copy (see losses.logits_peak_bytes). How many tokens a chunk has is the engine's
# (worker/training/tunables.py), passed in as `loss_chunk_tokens`.
FUSED_LOSS_BYTES_PER_LOGIT = 4 + 2

_COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch")

# hqq's packed storage per weight: 3-bit weights go ten to an int32 word (hqq's "3bit_32" packing).
HQQ_PACKED_BITS = {2: 2.0, 3: 3.2, 4: 4.0, 8: 8.0}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory of one training job, in bytes, by where it goes."""

    base_weights: int  # frozen base: quantized decoder linears + embeddings, head (if untied), norms in compute dtype
    lora_params: int  # trainable adapter weights, fp32 (peft keeps adapters in fp32 by default)
    gradients: int  # grads of the trainable params, fp32
    optimizer_state: int  # AdamW's two states (8-bit or fp32, see optimizer_state_bytes)
    optimizer_paged: bool  # the optimizer is a paged one (its large state buffers live in CUDA unified memory)
    activations: int  # tensors saved for backward (plus the per-layer weight casts autocast saves)
    logits: int  # peak of the output head / loss path (at the start of backward)
    overhead: int  # fixed allowance + transient full-size weights (dequantization, DoRA); no CUDA context
    gradient_checkpointing: bool
    tokens_per_micro_batch: int
    # Part of optimizer_state in unified memory (not counted by torch.cuda.max_memory_allocated). Only buffers
    # of tensors with >= 100k elements are paged, so this is often less than optimizer_state.
    optimizer_paged_bytes: int = 0
    # With gradient checkpointing: one layer's full activations, rebuilt during backward one layer at a time.
    # The loss path's tensors are freed by then, so this and `logits` never coexist: the peak takes the larger.
    recompute: int = 0
    # Checkpointing per decoder layer: how many layers keep everything (off), keep only the large matmul and
    # attention outputs (selective) or keep only their input (on).
    layers_off: int = 0
    layers_selective: int = 0
    layers_on: int = 0
    layers_offload: int = 0
    # Host (pinned CPU) memory the offloaded layers' inputs take at the end of the forward pass; not in `total`.
    host_activations: int = 0
    sequence_tiling: bool = False  # the MLPs run in sequence tiles (their full-length tensors never exist)
    # One rank of a job on `world_size` GPUs (every other field is that rank's). Data parallel: the flat buffer the
    # LoRA gradients are all-reduced in, after the backward pass (so it never coexists with the activations).
    # Sharded (FSDP): base weights, LoRA weights, gradients and optimizer state are 1/world_size each, the
    # quantization state is replicated, and two decoder layers are gathered whole at a time (`gathered_layers`).
    world_size: int = 1
    sharded: bool = False
    communication: int = 0
    gathered_layers: int = 0
    # A forward without gradients (evaluation; a dpo job's reference pass before step 1) of `no_grad_tokens`: one
    # layer's tensors at a time, then one chunk of the head. It takes the place of a training pass (gradients are
    # freed after each step; it saves nothing for backward), so the peak takes the larger of the two. 0 when it
    # holds no more tokens than a training pass, which then bounds it.
    no_grad_pass: int = 0
    no_grad_tokens: int = 0

    @property
    def training_pass(self) -> int:
        """What a training pass adds to the weights and optimizer state at its peak (a rank's gathered layers while
        its activations live; the gradients' all-reduce buffer after they are freed)."""
        return self.gradients + max(self.activations + max(self.logits, self.recompute) + self.gathered_layers, self.communication)

    @property
    def total(self) -> int:
        """Everything the card must hold at the peak (without the CUDA context)."""
        return (
            self.base_weights
            + self.lora_params
            + self.optimizer_state
            + max(self.training_pass, self.no_grad_pass + self.gathered_layers)
            + self.overhead
        )

    @property
    def torch_allocated_peak(self) -> int:
        """``total`` minus the paged optimizer state: comparable to ``torch.cuda.max_memory_allocated``."""
        return self.total - self.optimizer_paged_bytes

    def to_dict(self) -> dict[str, Any]:
        """All fields and both totals, in bytes and (as ``<name>_gib``) in GiB rounded to 3 places."""
        values: dict[str, Any] = asdict(self)
        values["total"] = self.total
        values["training_pass"] = self.training_pass
        values["torch_allocated_peak"] = self.torch_allocated_peak
        for name, value in list(values.items()):
            if isinstance(value, int) and not isinstance(value, bool) and name not in ("tokens_per_micro_batch", "world_size", "no_grad_tokens"):
                values[f"{name}_gib"] = round(value / GIB, 3)
        return values


def bits_per_weight(
    quantization: str, quant_type: str = "nf4", double_quant: bool = True, *, compute_dtype: str = "bf16",
    hqq_bits: int = 4, hqq_group_size: int = 64,
) -> float:
    """Storage bits per weight of a frozen base linear layer quantized on load (the job's `quantization`).

    4bit: 4 bits + one absmax per block of 64. Without double quantization the absmax is fp32 (32/64 = 0.5);
    with it, an 8-bit code per block plus one fp32 absmax per 256 blocks: 8/64 + 32/(64*256) = 0.127.
    8bit: 8.0; LLM.int8's fp32 scale per output row (32/in_features bits) is added by ``estimate_memory``.
    hqq: ``hqq_bits`` packed (3 bits: ten values per int32 word, 3.2) + a scale and a zero per group of
    ``hqq_group_size`` weights along the input, both in the compute dtype (4.5 for 4-bit, groups of 64, bf16).
    none: the compute dtype's width. NF4 and FP4 take the same space.
    """
    if quantization == "4bit":
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"unknown quant_type {quant_type!r}")
        absmax_bits = 8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64
        return 4 + absmax_bits
    if quantization == "8bit":
        return 8.0
    if quantization == "hqq":
        if hqq_bits not in HQQ_PACKED_BITS:
            raise ValueError(f"unknown hqq_bits {hqq_bits!r}")
        return HQQ_PACKED_BITS[hqq_bits] + 2 * 8 * _compute_bytes(compute_dtype) / hqq_group_size
    if quantization == "none":
        return 8.0 * _compute_bytes(compute_dtype)
    raise ValueError(f"unknown quantization {quantization!r}")


def prequantized_bits_per_weight(method: str, bits: int, group_size: int, fan_in: int, fan_out: int) -> float:
    """Storage bits per weight of one linear layer of a GPTQ or AWQ base (a ``fan_in`` x ``fan_out`` layer).

    Both pack ``bits`` per weight into int32 words, and keep per group of ``group_size`` input weights and per output
    column an fp16 scale and a ``bits``-bit zero (packed too): ``bits + (16 + bits) / group_size``. GPTQ also keeps an
    int32 group index per input row (``g_idx``): ``32 / fan_out``. group_size -1 means one group per column (the
    whole input). 4-bit, groups of 128: 4.156 (AWQ), 4.156 + 32/fan_out (GPTQ).
    """
    if method not in PREQUANTIZED_METHODS:
        raise ValueError(f"unknown pre-quantized method {method!r}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported {method} bits {bits!r}")
    group = fan_in if group_size in (-1, None) else group_size
    if group <= 0:
        raise ValueError(f"invalid {method} group_size {group_size!r}")
    total = bits + (16 + bits) / group
    if method == "gptq":
        total += 32 / fan_out
    return total


def _base_linear_bytes(model_config: Any, cfg: TrainingConfig, shapes: dict[str, tuple[int, int]]) -> float:
    """Bytes of one decoder layer's frozen linear weights, as the base directory stores them (GPTQ/AWQ) or as the
    job quantizes them on load."""
    stored = stored_format(model_config)
    if stored is not None and stored["method"] in PREQUANTIZED_METHODS:
        if stored["bits"] is None:
            raise ValueError(f"the base's {stored['method']} quantization_config does not say its bits")
        return sum(fan_in * fan_out * prequantized_bits_per_weight(stored["method"], stored["bits"], stored["group_size"],
                                                                   fan_in, fan_out)
                   for fan_in, fan_out in shapes.values()) / 8
    bits = bits_per_weight(cfg.quantization, cfg.quant_type, cfg.double_quant, compute_dtype=cfg.compute_dtype,
                           hqq_bits=cfg.hqq_bits, hqq_group_size=cfg.hqq_group_size)
    base = sum(fan_in * fan_out for fan_in, fan_out in shapes.values()) * bits / 8
    if cfg.quantization == "8bit":
        base += 4 * sum(fan_out for _, fan_out in shapes.values())  # LLM.int8: fp32 scale per output row
    return base


def _compute_bytes(compute_dtype: str) -> int:
    try:
        return _COMPUTE_BYTES[compute_dtype]
    except KeyError:
        raise ValueError(f"unknown compute_dtype {compute_dtype!r}") from None


def _target_names(target_modules: str | list[str]) -> tuple[str, ...]:
    """The adapted linears of a decoder layer. peft matches a listed name against the end of a module's
    path, so 'self_attn.q_proj' means q_proj; 'all-linear' means every linear but the output head."""
    if target_modules == "all-linear":
        return LINEAR_NAMES
    names = set()
    for entry in target_modules:
        name = entry.rsplit(".", 1)[-1]
        if name not in LINEAR_NAMES:
            raise ValueError(f"cannot estimate memory for target module {entry!r}: known modules are {LINEAR_NAMES}")
        names.add(name)
    return tuple(name for name in LINEAR_NAMES if name in names)


def optimizer_state_bytes(optimizer: str, tensor_numels: list[int]) -> tuple[int, int]:
    """(all state bytes, bytes in unified memory) of AdamW's two states for these trainable tensors.

    8-bit (bitsandbytes): 1 byte per element per state for tensors with >= 4096 elements, plus one fp32
    absmax per block of 256 per state; fp32 (4 bytes) per state below that size. 32-bit: 4 bytes per state.
    Paged optimizers page only the state buffers of tensors with >= 100k elements; absmax stays in torch memory.
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    eight_bit = optimizer.endswith("8bit")
    paged = optimizer.startswith("paged_")
    total = in_unified = 0
    for n in tensor_numels:
        if eight_bit and n >= BNB_MIN_8BIT_SIZE:
            buffers, absmax = 2 * n, 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCKSIZE)
        else:
            buffers, absmax = 2 * 4 * n, 0
        total += buffers + absmax
        if paged and n >= BNB_PAGED_MIN_NUMEL:
            in_unified += buffers
    return total, in_unified


def _attention_saves(s: ModelShape, cfg: TrainingConfig, c: int, row_len: int) -> tuple[int, int, int, bool]:
    """Per-token bytes the attention kernel saves, its per-layer s^2 bytes per row, the s^2 mask bytes per row
    shared by all layers, and whether the kernel saves its output (which o_proj's LoRA may then share)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    s2 = row_len * row_len
    attn = cfg.attn_implementation
    if attn == "eager":
        # matmul(q, k^T) saves q and the head-repeated k; softmax (dtype=fp32) saves its fp32 output; the
        # compute-dtype copy of it and the repeated v are saved by matmul(p, v). Output not saved.
        # Shared: the additive causal mask in compute dtype.
        return c * q * 3, s.heads * s2 * (4 + c), c * s2, False
    if attn == "sdpa":
        # Packing (per-example boundaries) and padded batches both give transformers a 4-D mask, so it repeats
        # k/v to all heads (repeat_kv) and SDPA runs its memory-efficient kernel, which saves the bool mask
        # converted to a compute-dtype bias (one per layer). Shared: the bool mask itself.
        per_token = c * q + 2 * c * q + c * q + 4 * s.heads  # q, k and v at full head width, output, lse fp32
        return per_token, c * s2, s2, True
    # flash_attention_2 and varlen (no dense mask) and flex_attention (block mask): GQA at kv width.
    per_token = c * q + 2 * c * kv + c * q + 4 * s.heads  # q, k, v, output, logsumexp (fp32 per head)
    return per_token, 0, 0, True


def _as_planned(cfg: TrainingConfig) -> TrainingConfig:
    """`cfg` with its 'auto' options decided for the GPU the estimate plans for (contract.device_choices): the rest
    of this module reads compute_dtype, lean_activations and attn_implementation as decided."""
    choices = decide_auto(cfg, PLANNED_GPU)
    return choices.apply(cfg).model_copy(update={"attn_implementation": choices.attn_implementation})


def _lean_lora(cfg: TrainingConfig) -> bool:
    """Whether the LoRA branches run lean_activations.LoraBranch (lean activations; DoRA keeps peft's own path)."""
    return cfg.lean_activations and not cfg.use_dora


def _stream_bytes(cfg: TrainingConfig, targets: tuple[str, ...], c: int) -> int:
    """Bytes per element of the residual stream: DoRA on o_proj or down_proj makes it fp32 under autocast."""
    return 4 if cfg.use_dora and ("o_proj" in targets or "down_proj" in targets) else c


def _layer_saved_bytes_per_token(
    s: ModelShape,
    cfg: TrainingConfig,
    shapes: dict[str, tuple[int, int]],
    targets: tuple[str, ...],
    attn_per_token: int,
    attn_saves_output: bool,
    tiled_mlp: bool = False,
) -> int:
    """Bytes saved for backward per token by one decoder layer (the s^2 and per-layer constant terms apart).

    The formula, c = compute dtype bytes (2 for bf16), h = hidden, i = intermediate, r = LoRA rank:
      2 * (4h + 4)          input_layernorm and post_attention_layernorm: each saves the fp32 upcast of its input
                            (for pow and the multiply) and rsqrt(variance), [tokens, 1] fp32. The final
                            ``weight * x`` saves only the weight (frozen), so the bf16 norm output is not saved.
      attention             q, k, v (after RoPE), output, fp32 logsumexp: see _attention_saves
                            (flash: 2c*q + 2c*kv + 4*heads)
      3 * c * i             SiLU saves its input (gate output); silu(gate) * up saves both factors.
      per adapted module m with input width in_m:
        dropout > 0:  (c + 1) * in_m + c * r   dropout output (saved by lora_A) + its bool mask + lora_A output
        dropout = 0:  c * r                    + the input c * in_m, once per distinct input (shared by
                                               q/k/v and by gate/up; o_proj's input is the SDPA output, already
                                               saved), or once per module with quantization='none' (fresh casts)
        DoRA:         + (4 + c) * out_m        base (fp32, see below) and LoRA results saved by the magnitude
                                               multiplications; a DoRA gate/up also makes SwiGLU's tensors fp32
      8-bit base: + c * in for each distinct base-layer input not saved already (MatMul8bitLt saves its input).
      RoPE saves only cos/sin (shared by all layers); residual adds and the 4-bit base matmuls save nothing.
    For Llama-3-8B with LoRA on all 7 linears, r=16, dropout 0.05, flash attention:
      23h + 7q + 4kv + 9i + 14r + 4*heads + 8  (q = heads*head_dim, kv = kv_heads*head_dim) = 256,360 bytes.

    With lean_activations (worker/training/lean_activations.py) three of those terms shrink:
      2 * (c*h + 4)         each RMSNorm keeps its input in the compute dtype (and the fp32 scale)
      2 * c * i             SwiGLU keeps gate and up; silu is recomputed
      c * r                 per adapted module: its input is rebuilt in backward (q/k/v and gate/up: the norm's
                            output from the norm's input and scale; down_proj: silu(gate) * up from gate and up)
                            or kept anyway (o_proj: the attention output); the dropout mask is replayed, not kept
    and the compute-dtype casts of the LoRA weights are not kept (the per-layer constant of estimate_memory).
    DoRA layers keep peft's own LoRA path. For Llama-3-8B as above: 94,568 bytes.

    With `tiled_mlp` (sequence tiling, worker/training/long_context.TiledMLP) the MLP keeps only its input, c * h:
    SwiGLU's terms and gate/up/down's LoRA (and DoRA, 8-bit) terms are gone. For Llama-3-8B, lean: 45,248 bytes.
    """
    c = _compute_bytes(cfg.compute_dtype)
    h, i, r = s.hidden, s.intermediate, cfg.lora_r

    # peft's DoRA output is fp32 under autocast (fp32 magnitude times the result), so a DoRA gate/up makes the
    # SwiGLU tensors fp32 too.
    gate = 4 if cfg.use_dora and "gate_proj" in targets else c
    up = 4 if cfg.use_dora and "up_proj" in targets else c

    lean, lean_lora = cfg.lean_activations, _lean_lora(cfg)
    stream = _stream_bytes(cfg, targets, c)
    total = 2 * ((stream if lean else 4) * h + 4)  # the two RMSNorms: their input (fp32 upcast unless lean), rsqrt
    total += attn_per_token
    if tiled_mlp:
        total += c * h  # TiledMLP keeps its input; the MLP's own tensors exist one tile at a time, in backward
    else:
        total += (gate + up if lean else 2 * gate + up) * i  # SwiGLU: silu's input (and output unless lean), up's output
    saved_sources = {"attn_out"} if attn_saves_output else set()
    if tiled_mlp:
        saved_sources |= {"mlp_norm", "mlp_act"}  # nothing of the MLP's modules is kept
    fresh_copy_per_module = cfg.quantization == "none" and c != 4 and not lean_lora  # peft casts x to fp32, autocast back
    for name in targets:
        if tiled_mlp and _INPUT_OF[name] in ("mlp_norm", "mlp_act"):
            continue
        in_m, out_m = shapes[name]
        total += c * r  # lora_A output, saved by lora_B
        if lean_lora:
            if _INPUT_OF[name] in ("attn_norm", "mlp_norm", "mlp_act"):
                pass  # rebuilt in backward: a norm's output from the norm's input and scale, silu(gate) * up from gate and up
            elif _INPUT_OF[name] not in saved_sources:
                total += c * in_m  # the branch keeps its input, once per distinct input; the mask is replayed
                saved_sources.add(_INPUT_OF[name])
        elif cfg.lora_dropout > 0:
            total += (c + 1) * in_m  # dropout output (saved by lora_A) + bool mask
        elif fresh_copy_per_module:
            total += c * in_m
        elif _INPUT_OF[name] not in saved_sources:
            total += c * in_m  # lora_A saves the module input itself
            saved_sources.add(_INPUT_OF[name])
        if cfg.use_dora:
            # base result and LoRA result, saved by the magnitude multiplications; the base result is fp32 once
            # the residual stream is (from the second layer on), so 4 bytes is counted for it throughout.
            total += (4 + c) * out_m
    if cfg.quantization == "8bit":
        for name in LINEAR_NAMES:
            if _INPUT_OF[name] not in saved_sources:
                total += c * shapes[name][0]
                saved_sources.add(_INPUT_OF[name])
    return total


def estimate_memory(
    model_config: Any,
    cfg: TrainingConfig,
    *,
    loss_chunk_tokens: int,
    tokens_per_micro_batch: int | None = None,
    gradient_checkpointing: bool | None = None,
    layer_modes: Sequence[str] | None = None,
    sequence_tiling: bool | None = None,
    world_size: int = 1,
    sharded: bool = False,
) -> MemoryEstimate:
    """Estimate the peak GPU memory of training ``model_config`` with ``cfg``, on one GPU or, with ``world_size``,
    on each of that many (data parallel; with ``sharded``, FSDP: see MemoryEstimate's last fields). A rank's
    micro-batches are as large as one GPU's (a step's examples are split, not its passes), so are its activations.

    loss_chunk_tokens: the tokens per chunk of the engine's fused loss (``worker.training.tunables.LOSS_CHUNK_TOKENS``:
    an engine setting the estimate models, so its callers pass it).

    tokens_per_micro_batch: tokens in one forward/backward pass; default ``micro_batch_size * max_seq_length``
    (every example at full length, the worst case; twice that for method dpo, whose units are pairs). A pass
    without gradients (evaluation, dpo's reference pass) holds ``eval_batch_size`` units when that is set. With packing the micro-batch is one row of that many tokens;
    without, rows of at most ``max_seq_length``.
    gradient_checkpointing: None takes it from ``cfg``: 'on' -> True, 'off' -> False, 'selective' -> every layer
    selective, and 'auto' -> True (the least memory; the engine decides 'auto' with
    ``device_choices.plan_checkpointing``, which passes layer_modes).
    layer_modes: the checkpointing of each decoder layer ('off', 'selective' or 'on', see
    ``device_choices.plan_memory``); overrides gradient_checkpointing. An 'offload' layer is an 'on' layer whose
    kept input is in host memory (``host_activations``, not in ``total``).
    sequence_tiling: whether the MLPs run in tiles of ``SEQUENCE_TILE_TOKENS``; None takes it from ``cfg``
    (True only when set so: 'auto' is the plan's to decide).
    """
    cfg = _as_planned(cfg)
    s = read_shape(model_config)
    c = _compute_bytes(cfg.compute_dtype)
    tokens = tokens_per_micro_batch if tokens_per_micro_batch is not None else cfg.micro_batch_size * cfg.max_seq_length
    pair = 2 if cfg.method == "dpo" else 1  # a dpo unit is a pair: both answers go through one forward
    if tokens_per_micro_batch is None:
        tokens *= pair
    if tokens < 1:
        raise ValueError("tokens_per_micro_batch must be positive")
    if layer_modes is None:
        if gradient_checkpointing is None:
            mode = {"off": "off", "selective": "selective", "offload": "offload"}.get(cfg.gradient_checkpointing, "on")
        else:
            mode = "on" if gradient_checkpointing else "off"
        layer_modes = [mode] * s.layers
    if len(layer_modes) != s.layers or set(layer_modes) - set(LAYER_MODES):
        raise ValueError(f"layer_modes must give one of {LAYER_MODES} for each of the {s.layers} layers")
    n_off, n_selective, n_on, n_offload = (sum(1 for m in layer_modes if m == mode) for mode in LAYER_MODES)
    gradient_checkpointing = n_off < s.layers
    tiled = cfg.sequence_tiling is True if sequence_tiling is None else sequence_tiling
    shapes = linear_shapes(model_config)
    targets = _target_names(cfg.target_modules)

    # --- frozen base -----------------------------------------------------------------------------------
    base = _base_linear_bytes(model_config, cfg, shapes) * s.layers
    unquantized = s.vocab * s.hidden * (1 if s.tied else 2)  # embeddings (+ untied head: never quantized)
    unquantized += (2 * s.layers + 1) * s.hidden  # RMSNorm weights
    if s.attention_bias:
        unquantized += s.layers * sum(shapes[n][1] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if s.mlp_bias:
        unquantized += s.layers * sum(shapes[n][1] for n in ("gate_proj", "up_proj", "down_proj"))
    base_weights = math.ceil(base) + unquantized * c
    gathered_layers = 0
    if world_size < 1:
        raise ValueError("world_size must be at least 1")
    if sharded:
        if cfg.quantization not in ("4bit", "none") or stored_format(model_config) is not None:
            raise ValueError(f"a {cfg.quantization} base cannot be sharded (FSDP shards 4-bit and unquantized bases only)")
        # The packed weights are sharded; the 4-bit quantization state (absmax and code tables: the bits past 4) is not.
        layer_weights = sum(fan_in * fan_out for fan_in, fan_out in shapes.values())
        packed = layer_weights * (4 / 8 if cfg.quantization == "4bit" else c)
        state = base - packed * s.layers
        base_weights = math.ceil(packed * s.layers / world_size) + math.ceil(state) + math.ceil(unquantized * c / world_size)
        gathered_layers = 2 * math.ceil(packed)  # the layer computed and the one prefetched, whole

    # --- adapters, gradients, optimizer ----------------------------------------------------------------
    trainable: list[int] = []  # element counts of each trainable tensor (the 8-bit optimizer rules are per tensor)
    for name in targets:
        fan_in, fan_out = shapes[name]
        trainable += [cfg.lora_r * fan_in, fan_out * cfg.lora_r]  # lora_A, lora_B
        if cfg.use_dora:
            trainable.append(fan_out)  # magnitude vector
    trainable *= s.layers
    lora_params = 4 * sum(trainable)
    gradients = 4 * sum(trainable)
    optimizer_state, optimizer_paged_bytes = optimizer_state_bytes(cfg.optimizer, trainable)
    communication = gradients if world_size > 1 and not sharded else 0  # the all-reduce's flat buffer
    if sharded:
        gathered_layers += 2 * 4 * sum(trainable) // s.layers  # two layers' LoRA weights, gathered with the base
        lora_params, gradients = math.ceil(lora_params / world_size), math.ceil(gradients / world_size)
        optimizer_state, optimizer_paged_bytes = (math.ceil(optimizer_state / world_size), math.ceil(optimizer_paged_bytes / world_size))

    # --- activations -----------------------------------------------------------------------------------
    row_len = tokens if cfg.packing else min(tokens, cfg.max_seq_length)
    rows = math.ceil(tokens / row_len)
    attn_per_token, attn_s2_per_row, mask_per_row, attn_saves_output = _attention_saves(s, cfg, c, row_len)
    per_token = _layer_saved_bytes_per_token(s, cfg, shapes, targets, attn_per_token, attn_saves_output, tiled)
    # Per layer, not per token: the attention's s^2 tensors, and the compute-dtype copies of the fp32 LoRA
    # weights that autocast makes and the LoRA matmuls save (none without autocast, i.e. fp32 compute).
    # (lean_activations.LoraBranch casts the weights again in backward instead of keeping the casts.)
    weight_casts = sum(cfg.lora_r * sum(shapes[name]) for name in targets) * c if c < 4 and not _lean_lora(cfg) else 0
    one_layer = tokens * per_token + rows * attn_s2_per_row + weight_casts
    # transformers' non-reentrant checkpointing per decoder layer keeps each checkpointed layer's input hidden
    # state; backward recomputes one layer at a time, holding that layer's full activations. DoRA on o_proj or
    # down_proj makes the residual stream fp32 under autocast (its output is fp32). A selective layer also keeps
    # the outputs of its large matmuls and of the attention kernel (see selective_saved_bytes_per_token).
    stream = _stream_bytes(cfg, targets, c)
    selective = tokens * selective_saved_bytes_per_token(model_config, cfg) + (rows * attn_s2_per_row if cfg.attn_implementation == "eager" else 0)
    activations = (n_on + n_selective) * tokens * s.hidden * stream + n_selective * selective + n_off * one_layer
    recompute = one_layer if gradient_checkpointing else 0
    # An offloaded layer keeps its input in host memory; in backward the device holds the input of the layer being
    # recomputed (inside one_layer's norm input) and the prefetched input of the layer below.
    host_activations = n_offload * tokens * s.hidden * stream
    if n_offload:
        recompute += tokens * s.hidden * stream
    if tiled:
        # Backward of one MLP tile: that tile's full MLP tensors (what an untiled layer keeps per token, less the
        # input TiledMLP keeps), on top of the layer's own.
        untiled = _layer_saved_bytes_per_token(s, cfg, shapes, targets, attn_per_token, attn_saves_output, False)
        tile_peak = min(SEQUENCE_TILE_TOKENS, tokens) * (untiled - per_token + c * s.hidden)
        recompute = recompute + tile_peak if gradient_checkpointing else tile_peak
    activations += tokens * ((stream if cfg.lean_activations else 4) * s.hidden + 4)  # final RMSNorm, as in each layer
    activations += tokens * 2 * s.head_dim * c  # RoPE cos and sin, shared by all layers
    activations += rows * mask_per_row

    # --- logits and loss -------------------------------------------------------------------------------
    # Peak at the start of backward (checked on a tiny model: 12.3 bytes per logit when the loop keeps no
    # reference to the model output, as trainer.forward_loss does: it returns only the summed loss), per token*vocab:
    #   4   log_softmax output in fp32 (input: the loop's logits.float(); that copy itself is freed after
    #       the forward), saved by cross_entropy for backward
    #   4   gradient of the log_softmax output, a dense fp32 tensor made by nll_loss's backward
    #   4   gradient of the fp32 logits made by log_softmax's backward while the two above are still alive
    # The forward peak (c head output + 4 upcast + 4 log_softmax output) is no higher for c <= 4.
    logits = tokens * s.vocab * 12
    if cfg.fused_cross_entropy:
        # losses.linear_cross_entropy: the gradient of the hidden states, computed in the forward pass and
        # kept to the backward (which scales it in place), and one chunk's logits at a time.
        logits = tokens * s.hidden * c + fused_loss_chunk_bytes(min(loss_chunk_tokens, tokens), s.vocab)

    # --- overhead --------------------------------------------------------------------------------------
    # Transient full-size weights, one linear at a time: the 4-bit/8-bit base dequantized to the compute dtype
    # for each matmul (forward and input-gradient); for DoRA, the weight-norm computation's identity matrix
    # (in*in, fp32), the dense LoRA product (fp32) and the dequantized weight.
    transient = 0
    if cfg.quantization != "none":
        transient = max(fan_in * fan_out for fan_in, fan_out in shapes.values()) * c
    if cfg.use_dora:
        transient = max(transient, max(4 * shapes[n][0] ** 2 + (8 + c) * shapes[n][0] * shapes[n][1] for n in targets))
    overhead = FIXED_OVERHEAD_BYTES + transient

    # --- a pass without gradients ------------------------------------------------------------------------
    # Evaluation, and a dpo job's reference pass (its log-probs computed once before step 1, grouped as evaluation
    # groups): eval_batch_size units of max_seq_length, else the training pass's grouping. At every point of its
    # forward a training pass of as many tokens holds all that a pass without gradients holds, so only a larger
    # eval_batch_size adds a term: the larger of the layers' phase (the residual stream in and out of a layer, and
    # what one layer holds at a time, bounded by what its forward saves for backward) and the head's (the final
    # hidden states and one chunk of logits, no gradient rows).
    no_grad_tokens = tokens if cfg.eval_batch_size is None else cfg.eval_batch_size * cfg.max_seq_length * pair
    no_grad_pass = 0
    if no_grad_tokens > tokens:
        ng_row_len = no_grad_tokens if cfg.packing and cfg.method != "dpo" else min(no_grad_tokens, cfg.max_seq_length)
        ng_attn_per_token, ng_s2_per_row, ng_mask_per_row, ng_saves_output = _attention_saves(s, cfg, c, ng_row_len)
        ng_rows = math.ceil(no_grad_tokens / ng_row_len)
        ng_layer = no_grad_tokens * _layer_saved_bytes_per_token(s, cfg, shapes, targets, ng_attn_per_token, ng_saves_output)
        shared = no_grad_tokens * 2 * s.head_dim * c + ng_rows * ng_mask_per_row  # RoPE tables and masks, kept throughout
        layers_phase = ng_layer + ng_rows * ng_s2_per_row + 2 * no_grad_tokens * s.hidden * 4
        head_phase = no_grad_tokens * s.hidden * (4 + c) + fused_loss_chunk_bytes(min(loss_chunk_tokens, no_grad_tokens), s.vocab)
        no_grad_pass = shared + max(layers_phase, head_phase)

    return MemoryEstimate(
        base_weights=base_weights,
        lora_params=lora_params,
        gradients=gradients,
        optimizer_state=optimizer_state,
        optimizer_paged=cfg.optimizer.startswith("paged_"),
        activations=activations,
        logits=logits,
        overhead=overhead,
        gradient_checkpointing=gradient_checkpointing,
        tokens_per_micro_batch=tokens,
        optimizer_paged_bytes=optimizer_paged_bytes,
        recompute=recompute,
        layers_off=n_off,
        layers_selective=n_selective,
        layers_on=n_on,
        layers_offload=n_offload,
        host_activations=host_activations,
        sequence_tiling=tiled,
        world_size=world_size,
        sharded=sharded,
        communication=communication,
        gathered_layers=gathered_layers,
        no_grad_pass=no_grad_pass,
        no_grad_tokens=no_grad_tokens,
    )


def fused_loss_chunk_bytes(chunk_tokens: int, vocab: int) -> int:
    """Peak working memory of one chunk of ``losses.linear_cross_entropy`` (``losses.logits_peak_bytes``; a test
    there checks it against what the loss allocates)."""
    return chunk_tokens * vocab * FUSED_LOSS_BYTES_PER_LOGIT


def selective_saved_bytes_per_token(model_config: Any, cfg: TrainingConfig) -> int:
    """Bytes per token a 'selective' layer keeps (besides its input): the outputs of every base matmul (q, k, v,
    o, gate, up, down), of each LoRA A matmul (rank r) and of the attention kernel (output and fp32
    logsumexp), all that ``model.selective_checkpoint_policy`` marks to save. The rest is recomputed."""
    cfg = _as_planned(cfg)
    s = read_shape(model_config)
    c = _compute_bytes(cfg.compute_dtype)
    shapes = linear_shapes(model_config)
    targets = _target_names(cfg.target_modules)
    base_outputs = c * sum(fan_out for _, fan_out in shapes.values())
    lora_a_outputs = c * cfg.lora_r * len(targets)
    attention = c * s.heads * s.head_dim + 4 * s.heads
    return base_outputs + lora_a_outputs + attention
