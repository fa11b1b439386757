"""The engine's training configuration: every option, its default, and the checks that run before any work.

One pydantic model, `TrainingConfig`, holds every knob. Unknown keys and out-of-range values are rejected
when it is built; option combinations that cannot work together are rejected by `validate_combinations`
(also run on construction), and device-dependent checks by `check_runtime`. Each failure is a
`ConfigError` whose `param` names the offending option, so the service can put it in the error envelope.

docs/training.md lists every option; keep the two in step.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contract.errors import ConfigError

# The training methods (OpenAI's `method.type`); each has an objective in worker/training/objectives/.
Method = Literal["supervised", "dpo"]
PreferenceLoss = Literal["sigmoid", "ipo", "simpo", "orpo"]
# The options of method dpo; a supervised job that names one is refused (`unused_options`).
DPO_OPTIONS = ("beta", "loss_type", "simpo_gamma", "rpo_alpha")
METHODS: tuple[str, ...] = get_args(Method)
QuantizationMode = Literal["4bit", "8bit", "hqq", "none", "gptq", "awq"]
HqqBits = Literal[2, 3, 4, 8]
QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["auto", "bf16", "fp16", "fp32"]
OptimizerName = Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"]
SchedulerName = Literal["cosine", "linear", "constant"]
GradientCheckpointing = Literal["auto", "on", "selective", "off", "offload"]
AttnImplementation = Literal["auto", "varlen", "sdpa", "eager", "flex_attention", "flash_attention_2"]
FusedKernels = Literal["auto", "on", "off"]

ALL_LINEAR = "all-linear"

# The longest max_seq_length a job may ask for: what the memory estimate admits for an 8B base on an 80 GB card with
# offloaded checkpoints and sequence tiling (bench/context_lengths.py prints the table); the memory budget decides
# what a given job gets (contract.device_choices.check_fits).
MAX_SEQ_LENGTH = 1048576

# Why quantization='eetq' is refused, and what to use instead (docs/training.md, "Quantization routes").
EETQ_REFUSED = (
    "quantization='eetq' is not supported: the eetq package has no build for this service's torch, and "
    "transformers' EETQ path fetches its kernels from a model hub at run time, which a self-hosted service cannot "
    "rely on. Use quantization='8bit' (bitsandbytes LLM.int8: 8-bit weights, as EETQ), 'hqq' (quantized on load "
    "without calibration data, as EETQ) or '4bit' (QLoRA NF4)."
)


class TrainingConfig(BaseModel):
    """Every option of a training job. Field docs are the reference; defaults follow the QLoRA paper
    (NF4 + double quantization, 16-bit compute where the device is fast at it, LoRA on all linear layers, paged
    8-bit AdamW)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    # --- method -----------------------------------------------------------------------------------
    method: Method = Field("supervised", description="The training method, OpenAI's method.type (set there, not among the hyperparameters). supervised: next-token cross-entropy on the target tokens. dpo: preference pairs (docs/training.md, DPO).")

    # --- preference tuning (method dpo) -----------------------------------------------------------
    beta: float = Field(0.1, gt=0, le=2, description="dpo: OpenAI's beta, 0 < beta <= 2: how far the policy may move from the reference (sigmoid, ipo), SimPO's reward scale, ORPO's lambda.")
    loss_type: PreferenceLoss = Field("sigmoid", description="dpo: sigmoid (DPO), ipo, or the reference-free simpo and orpo.")
    simpo_gamma: float = Field(0.5, ge=0, le=10, description="dpo with loss_type='simpo': the target reward margin gamma.")
    rpo_alpha: float | None = Field(None, ge=0, le=10, description="dpo: weight of an extra NLL term on the preferred answer (length-normalised, RPO); keeps answers well-formed.")

    # --- data -------------------------------------------------------------------------------------
    max_seq_length: int = Field(2048, ge=16, le=MAX_SEQ_LENGTH, description="Tokens per example; longer examples are truncated (and counted). A job whose length the memory estimate cannot fit into its memory budget is refused with the longest length that fits (docs/training.md, Long context).")
    train_on_inputs: bool = Field(False, description="Also train on prompt/system/user tokens, not only assistant tokens.")
    packing: bool = Field(True, description="Padding-free packing: the examples of a micro-batch share one row, with per-example position ids and no attention across them. False: padded batches.")
    shuffle: bool = Field(True, description="Shuffle the training examples each epoch (seeded).")

    # --- model: quantization ----------------------------------------------------------------------
    quantization: QuantizationMode = Field("4bit", description="How the frozen base is stored: 4-bit (QLoRA, bitsandbytes), 8-bit LLM.int8, hqq (HQQ, see hqq_bits) or none (plain LoRA), quantized on load; gptq or awq: the base is a pre-quantized checkpoint of that method (set from its config.json when a job is created). eetq is refused. See docs/training.md.")
    quant_type: QuantType = Field("nf4", description="4-bit data type: NormalFloat4 or FP4. Only with quantization=4bit.")
    double_quant: bool = Field(True, description="Quantize the 4-bit absmax constants again (~0.37 bits/weight saved). Only with quantization=4bit.")
    hqq_bits: HqqBits = Field(4, description="Bits per weight of an HQQ base (plus a scale and a zero per group, in the compute dtype). Only with quantization=hqq.")
    hqq_group_size: int = Field(64, ge=8, le=1024, multiple_of=8, description="Weights per HQQ scale/zero group, along a layer's input; must divide every quantized layer's input width. Only with quantization=hqq.")
    compute_dtype: ComputeDtype = Field("auto", description="Dtype of the matmuls through the dequantized base. auto: bf16 where the device computes it fast (CUDA falls back to fp16), else fp32; a job records the choice.")
    attn_implementation: AttnImplementation = Field("auto", description="Attention kernel. varlen: per-example attention over a packed row with no dense mask (needs packing). auto: varlen with packing, else sdpa. The others are transformers' own.")

    # --- model: LoRA ------------------------------------------------------------------------------
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, le=100000, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(ALL_LINEAR, description="Module names to adapt, or 'all-linear' (every linear layer but the output head).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    gradient_checkpointing: GradientCheckpointing = Field("auto", description="Activation checkpointing per decoder layer. on: recompute each layer in the backward pass (least memory). off: keep everything. auto: on a GPU as many layers off as fit into memory_budget_gb, the rest on, and when even that does not fit, layers offloaded (and sequence_tiling if 'auto') until it does; off on the CPU. offload: as on, with each layer's kept input in host memory (long context). selective (experimental, never chosen by auto): keep only the large matmul and attention outputs.")
    sequence_tiling: bool | Literal["auto"] = Field("auto", description="Run each decoder layer's MLP (and its LoRA branches) a tile of tokens at a time, recomputed in backward, so that no [tokens x intermediate] tensor is whole (long context). auto: on only when gradient_checkpointing='auto' needs it to fit the memory budget.")
    memory_budget_gb: float | None = Field(None, gt=0, le=10000, description="GiB of GPU memory gradient_checkpointing=auto plans for. None: 85% of the GPU memory free when the job starts.")

    # --- optimizer and schedule -------------------------------------------------------------------
    optimizer: OptimizerName = Field("paged_adamw_8bit", description="Optimizer for the LoRA parameters (paged ones fall back to unpaged on the CPU).")
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    lr_scheduler: SchedulerName = Field("cosine", description="Decay after warm-up: cosine to 0, linear to 0, or constant.")
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description="Share of the total steps spent warming up linearly from 0.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio (set only one).")
    max_grad_norm: float = Field(0.3, ge=0.0, description="Clip the global gradient norm to this; 0 disables clipping.")
    batch_size: int = Field(8, ge=1, le=256, description="Examples per optimizer step, 1 to 256 (OpenAI's bounds).")
    micro_batch_size: int = Field(4, ge=1, le=4096, description="Examples per forward/backward pass; batch_size must be a multiple of it (gradient accumulation = batch_size / micro_batch_size).")
    micro_batch_tokens: int | None = Field(None, ge=16, le=1048576, description="Tokens per forward/backward pass instead of a count of examples: each step's examples are packed into rows of at most this many tokens, one row per pass. Needs packing and at least max_seq_length; replaces micro_batch_size. None: micro_batch_size examples per pass.")
    n_epochs: int = Field(3, ge=1, le=50, description="Passes over the training file, 1 to 50 (OpenAI's bounds; ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides n_epochs).")
    fused_cross_entropy: bool = Field(True, description="Compute the loss from the hidden states chunk by chunk, never holding the whole [tokens x vocabulary] logits. False: the plain head + cross-entropy.")
    lean_activations: bool | Literal["auto"] = Field("auto", description="Keep fewer bytes per token for the backward pass and redo cheap work instead (worker/training/lean_activations.py); same results, so gradient_checkpointing=auto leaves more layers unchecked. auto: on with CUDA, off on the CPU.")
    fused_kernels: FusedKernels = Field("auto", description="Compile the elementwise math of lean_activations into fused kernels with torch.compile (the eager math runs if compiling fails, logged). auto: on with CUDA, off on the CPU. Needs lean_activations.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seeds data order, LoRA init and dropout.")

    # --- evaluation, checkpoints, logging ---------------------------------------------------------
    eval_every: int | None = Field(None, ge=1, description="Evaluate on the validation file every N steps (always at the end). None: only at the end.")
    eval_batch_size: int | None = Field(None, ge=1, le=4096, description="Examples per evaluation forward pass. None: as in training (micro_batch_tokens rows, else micro_batch_size examples), so evaluation never needs more memory than training.")
    checkpoint_every: int | None = Field(None, ge=1, description="Save an adapter checkpoint every N steps (always at the end). None: at the end of each epoch.")
    keep_checkpoints: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints on disk, and in the service's object storage (the final one always stays; so does the one a job resumed from). None: keep all.")

    @field_validator("quantization", mode="before")
    @classmethod
    def _refuse_eetq(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() == "eetq":
            raise ConfigError(EETQ_REFUSED, param="quantization", code="unsupported_value")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> TrainingConfig:
        validate_combinations(self)
        return self

    def steps_per_epoch(self, n_examples: int) -> int:
        return math.ceil(n_examples / self.batch_size)

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps of a job on `n_examples` training examples: max_steps, else n_epochs full epochs."""
        return self.max_steps if self.max_steps is not None else self.n_epochs * self.steps_per_epoch(n_examples)

    @property
    def gradient_accumulation_steps(self) -> int:
        """Passes per optimizer step; with micro_batch_tokens it depends on the step's examples (this is the most)."""
        return self.batch_size if self.micro_batch_tokens is not None else self.batch_size // self.micro_batch_size

    @property
    def max_tokens_per_micro_batch(self) -> int:
        """The most tokens one forward/backward pass can hold (what memory is planned for when the data is unknown)."""
        return self.micro_batch_tokens if self.micro_batch_tokens is not None else self.micro_batch_size * self.max_seq_length

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build a config, turning pydantic's errors into one `ConfigError` naming the first bad option."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            if first["type"] == "extra_forbidden":
                raise ConfigError(f"Unknown option: {param!r}", param=param, code="unknown_hyperparameter") from None
            cause = first.get("ctx", {}).get("error")
            if isinstance(cause, ConfigError):
                raise cause from None
            message = first["msg"].removeprefix("Value error, ")
            raise ConfigError(f"Invalid value for {param!r}: {message}", param=param) from None

    def resolved(self) -> dict[str, Any]:
        """All options with their resolved values: what a job stores and echoes, and what `from_dict` rebuilds."""
        return self.model_dump()


def unused_options(cfg: TrainingConfig) -> dict[str, tuple[str, str]]:
    """The options that have no effect given the values of the others: name -> (param to blame, message)."""
    unused: dict[str, tuple[str, str]] = {}
    if cfg.quantization != "4bit":
        for name in ("quant_type", "double_quant"):
            unused[name] = (name, f"{name!r} applies only to quantization='4bit' (got quantization={cfg.quantization!r})")
    if cfg.quantization != "hqq":
        for name in ("hqq_bits", "hqq_group_size"):
            unused[name] = (name, f"{name!r} applies only to quantization='hqq' (got quantization={cfg.quantization!r})")
    if cfg.micro_batch_tokens is not None:
        unused["micro_batch_size"] = ("micro_batch_tokens", "set either micro_batch_size (examples per pass) or "
                                      "micro_batch_tokens (tokens per pass), not both")
    if cfg.warmup_steps is not None:
        unused["warmup_ratio"] = ("warmup_steps", "set either warmup_steps or warmup_ratio, not both")
    if cfg.method != "dpo":
        for name in DPO_OPTIONS:
            unused[name] = (name, f"{name!r} applies only to method 'dpo' (got {cfg.method!r})")
    elif cfg.loss_type != "simpo":
        unused["simpo_gamma"] = ("simpo_gamma", f"'simpo_gamma' applies only to loss_type='simpo' (got {cfg.loss_type!r})")
    return unused


def validate_combinations(cfg: TrainingConfig) -> None:
    """Reject option combinations that cannot work, before any model is loaded. Only values are tested, so a
    config rebuilt from its own `resolved()` passes: an option without effect must keep its default value (a
    changed one would be silently ignored)."""
    for name, (param, message) in unused_options(cfg).items():
        if getattr(cfg, name) != TrainingConfig.model_fields[name].default:
            raise ConfigError(message, param=param)
    if cfg.micro_batch_tokens is not None:
        if not cfg.packing:
            raise ConfigError("micro_batch_tokens packs examples into rows: it needs packing=true", param="micro_batch_tokens")
        if cfg.micro_batch_tokens < cfg.max_seq_length:
            raise ConfigError(f"micro_batch_tokens ({cfg.micro_batch_tokens}) must be at least max_seq_length ({cfg.max_seq_length}), "
                              "so that every example fits a row", param="micro_batch_tokens")
    elif cfg.batch_size % cfg.micro_batch_size != 0:
        raise ConfigError(
            f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size ({cfg.micro_batch_size})",
            param="micro_batch_size",
        )
    if cfg.warmup_steps is not None and cfg.max_steps is not None and cfg.warmup_steps > cfg.max_steps:
        raise ConfigError(f"warmup_steps ({cfg.warmup_steps}) exceeds max_steps ({cfg.max_steps})", param="warmup_steps")
    if cfg.method == "dpo" and isinstance(cfg.target_modules, list) and "lm_head" in cfg.target_modules:
        # The per-sequence log-probs come from the chunked head (worker/training/losses.py), which needs it frozen.
        raise ConfigError("method 'dpo' needs a frozen output head: leave 'lm_head' out of target_modules", param="target_modules")
    if isinstance(cfg.target_modules, list):
        if not cfg.target_modules:
            raise ConfigError("target_modules must name at least one module, or be 'all-linear'", param="target_modules")
        for name in cfg.target_modules:
            if not name or not name.replace("_", "").replace(".", "").isalnum():
                raise ConfigError(f"target_modules: {name!r} is not a module name", param="target_modules")
    if cfg.memory_budget_gb is not None and cfg.gradient_checkpointing != "auto":
        raise ConfigError("memory_budget_gb is what gradient_checkpointing='auto' plans for: set it only with 'auto'", param="memory_budget_gb")
    if cfg.attn_implementation == "varlen" and not cfg.packing:
        raise ConfigError("attn_implementation='varlen' works on packed rows: it needs packing=true", param="attn_implementation")
    if cfg.fused_kernels == "on" and cfg.lean_activations is False:
        raise ConfigError("fused_kernels compiles the math of lean_activations: it needs lean_activations=true", param="fused_kernels")
    if cfg.use_dora and cfg.quantization == "8bit":
        # peft's DoRA needs the dequantized weight norm; with LLM.int8 this path is unsupported in peft.
        raise ConfigError("use_dora is not supported with quantization='8bit'", param="use_dora")
    if cfg.use_dora and cfg.quantization in ("gptq", "awq"):
        raise ConfigError(f"use_dora is not supported on a pre-quantized ({cfg.quantization}) base", param="use_dora")


def options_markdown() -> str:
    """The options table of docs/training.md (a test keeps the two identical: `python -m contract.options`)."""

    def show(value: Any) -> str:
        return "none" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"

    rows = ["| option | default | meaning |", "|---|---|---|"]
    for name, field in TrainingConfig.model_fields.items():
        rows.append(f"| `{name}` | {show(field.default)} | {field.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(options_markdown(), end="")
