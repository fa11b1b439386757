"""The training loop as a recipe: setup, step, evaluate, checkpoint, finish. Read `train` top to bottom.

One call of `train(job, sink)` runs a whole job: `setup` validates the data and the options before loading
anything and builds the quantized model with LoRA into a `TrainingRun`; the loop then runs optimizer steps
(`train_step`), evaluates (`evaluate_step`) and checkpoints (`write_checkpoint`); `finish` writes the adapter. Each optimizer step takes
`batch_size` examples in micro-batches (gradient accumulation) of `micro_batch_size` examples, or packed into
rows of at most `micro_batch_tokens` tokens. The loss of a step
is the mean over all target tokens of the whole step, not the mean of per-micro-batch means (which would
weigh a token of a short micro-batch more than one of a long one).
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from contract.data_format import load_examples
from contract.metrics import StepMetrics
from contract.options import ConfigError, TrainingConfig
from worker.training import attention, lean
from worker.training.checkpoint import (
    TrainerPosition,
    checkpoint_name,
    load_adapter_weights,
    load_trainer_state,
    read_checkpoint_config,
    restore_rng,
    save_checkpoint,
)
from worker.training.data import (
    IGNORE_INDEX,
    TokenizedExample,
    TokenStats,
    collate_packed,
    collate_padded,
    pack_by_tokens,
    tokenize_examples,
)
from worker.training.losses import linear_cross_entropy
from worker.training.model import BuiltModel, build_model, check_runtime, compute_dtype, pick_device, read_model_config, resolve_for_device
from worker.training.optim import build_optimizer, build_scheduler
from worker.training.parallel import Replicas
from worker.training.sinks import NullSink, Sink


class NonFiniteLossError(RuntimeError):
    """A step's training loss was NaN or infinite: the run stops before the optimizer applies it."""

    def __init__(self, step: int, compute_dtype: str):
        super().__init__(f"the training loss of step {step} is not a finite number (compute_dtype={compute_dtype}); "
                         "try a lower learning_rate, or compute_dtype='fp32'")
        self.step = step


@dataclass
class TrainingJob:
    """What to train: a local base model directory, JSONL files, options and where to write."""

    base_model_dir: Path
    train_file: Path
    output_dir: Path
    config: TrainingConfig = field(default_factory=TrainingConfig)
    validation_file: Path | None = None


@dataclass
class TrainResult:
    status: str  # "succeeded" | "stopped"
    steps: int
    total_steps: int
    trained_tokens: int
    final_train_loss: float | None
    final_valid_loss: float | None
    adapter_dir: Path | None
    checkpoints: list[Path]
    train_stats: dict[str, Any]
    validation_stats: dict[str, Any] | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        out["checkpoints"] = [str(p) for p in self.checkpoints]
        return out


# --- batches -------------------------------------------------------------------------------------------

def epoch_order(n_examples: int, epoch: int, cfg: TrainingConfig) -> list[int]:
    """The example order of an epoch: a function of (seed, epoch) only, so a resumed job sees the same order."""
    if not cfg.shuffle:
        return list(range(n_examples))
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def collate(batch: list[TokenizedExample], cfg: TrainingConfig, pad_token_id: int) -> dict[str, torch.Tensor]:
    return collate_packed(batch) if cfg.packing else collate_padded(batch, pad_token_id)


def micro_batches(examples: list[TokenizedExample], cfg: TrainingConfig, size: int | None, pad_token_id: int):
    """The passes over `examples`: `size` examples each, or with size=None the configured grouping: rows of at
    most micro_batch_tokens tokens (best fit, `data.pack_by_tokens`) if set, else micro_batch_size examples."""
    if size is None and cfg.micro_batch_tokens is not None:
        for row in pack_by_tokens(examples, cfg.micro_batch_tokens):
            yield collate(row, cfg, pad_token_id)
        return
    size = size or cfg.micro_batch_size
    for start in range(0, len(examples), size):
        yield collate(examples[start : start + size], cfg, pad_token_id)


# --- loss ----------------------------------------------------------------------------------------------

def autocast_dtype(cfg: TrainingConfig) -> torch.dtype | None:
    """bf16/fp16 compute runs under autocast, so that the fp32 adapters' matmuls run in the compute dtype
    too (peft keeps adapter weights in fp32; without autocast their inputs are upcast and saved in fp32)."""
    dtype = compute_dtype(cfg)
    return None if dtype == torch.float32 else dtype


def forward_loss(model: Any, batch: dict[str, torch.Tensor], device: torch.device,
                 amp_dtype: torch.dtype | None = None, fused: bool = False) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy over the target tokens of a micro-batch.

    Returns (loss_sum, n_targets, n_correct). The caller divides by the target count of the whole step.
    `use_cache=False` matters beyond memory: with a KV cache, transformers does not derive the per-example
    attention mask of a packed row from its position ids, and packed examples would attend to each other.
    With varlen attention the packed row's example boundaries are computed here, once for all layers.
    fused: the loss comes from the hidden states through `losses.linear_cross_entropy` (no full logits)."""
    extra: dict[str, Any] = {}
    if getattr(model.config, "_attn_implementation", None) == attention.NAME and "attention_mask" not in batch:
        extra = attention.varlen_kwargs(batch["position_ids"], device)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = batch.pop("labels")
    if fused:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Row t predicts label t+1; the last position of a row predicts nothing.
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1).reshape(-1)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            hidden = base.model(**batch, use_cache=False, **extra).last_hidden_state
            head = base.get_output_embeddings()
            loss_sum, n_targets, n_correct = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head.weight, targets)
        return loss_sum, int(n_targets), int(n_correct)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(**batch, use_cache=False, **extra).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    flat_labels = shift_labels.reshape(-1)
    flat_logits = shift_logits.reshape(-1, shift_logits.size(-1))
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    mask = flat_labels != IGNORE_INDEX
    with torch.no_grad():
        correct = int((flat_logits.argmax(-1)[mask] == flat_labels[mask]).sum())
    return loss_sum, int(mask.sum()), correct


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Useful (non-pad) tokens in a micro-batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


@torch.no_grad()
def evaluate(model: Any, examples: list[TokenizedExample], cfg: TrainingConfig, device: torch.device, pad_token_id: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_total, targets, correct = 0.0, 0, 0
    for batch in micro_batches(examples, cfg, cfg.eval_batch_size, pad_token_id):
        loss_sum, n, c = forward_loss(model, batch, device, autocast_dtype(cfg), cfg.fused_cross_entropy)
        loss_total += float(loss_sum)
        targets += n
        correct += c
    if was_training:
        model.train()
    return {"valid_loss": loss_total / max(targets, 1), "valid_mean_token_accuracy": correct / max(targets, 1)}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the process's peak resident memory, the nearest CPU equivalent.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


# --- the job -------------------------------------------------------------------------------------------

def prepare_data(job: TrainingJob, tokenizer: Any) -> tuple[list[TokenizedExample], TokenStats, list[TokenizedExample], TokenStats | None]:
    """Validate and tokenize both files. Raises DataValidationError (every fault, with line numbers)."""
    cfg = job.config
    train_examples = load_examples(job.train_file)
    valid_examples = load_examples(job.validation_file, min_examples=1, role="validation") if job.validation_file else []
    train_tok, train_stats = tokenize_examples(tokenizer, train_examples, max_seq_length=cfg.max_seq_length, train_on_inputs=cfg.train_on_inputs)
    valid_tok, valid_stats = [], None
    if valid_examples:
        valid_tok, valid_stats = tokenize_examples(tokenizer, valid_examples, max_seq_length=cfg.max_seq_length, train_on_inputs=cfg.train_on_inputs)
    return train_tok, train_stats, valid_tok, valid_stats


def load_tokenizer(base_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Padding is masked out of the labels; if pad were the EOS token a careless mask would hide EOS too.
        # Our collators mask by position, not by token id, so any distinct id will do.
        tokenizer.pad_token_id = 0 if tokenizer.eos_token_id != 0 else 1
    return tokenizer


# --- the recipe: setup, step, evaluate, checkpoint, finish ------------------------------------------

@dataclass
class TrainingRun:
    """One job's training state, built by `setup` and advanced by `train_step`: what the loop reads and changes."""

    job: TrainingJob
    cfg: TrainingConfig  # the job's options decided for this device
    device: torch.device
    sink: Sink
    should_stop: Callable[[], bool]
    resume_from: Path | None
    started: float
    tokenizer: Any
    train_tok: list[TokenizedExample]
    train_stats: TokenStats
    valid_tok: list[TokenizedExample]
    valid_stats: TokenStats | None
    built: BuiltModel
    optimizer: Any
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    fused: bool  # the compiled kernels run
    position: TrainerPosition
    total_steps: int
    steps_per_epoch: int
    last: StepMetrics | None  # the newest step's metrics (a resumed run starts from its checkpoint's)
    last_valid: dict[str, float]
    resumed_at_end: bool  # resumed from the final checkpoint: no step left, the checkpoint is the adapter
    checkpoints: list[Path] = field(default_factory=list)
    stopped: bool = False
    replicas: Replicas = field(default_factory=Replicas)  # the processes sharing each step (parallel.py); one by default

    @property
    def model(self) -> Any:
        return self.built.model


def train(job: TrainingJob, sink: Sink | None = None, should_stop: Callable[[], bool] | None = None,
          resume_from: Path | None = None, should_pause: Callable[[], bool] | None = None,
          replicas: Replicas | None = None) -> TrainResult:
    """Run one training job to the end, or until `should_stop()` returns True (checked between micro-batches), or
    `should_pause()` does (checked after each step but the last: the run then writes a checkpoint of that step, if
    it has none, and stops; resumed from it, the run goes on as if never paused). `replicas`: the processes that
    share each step (worker/training/distributed.py); only the main one writes and reports."""
    run = setup(job, sink or NullSink(), should_stop or (lambda: False), resume_from)
    if replicas is not None:
        run.replicas = replicas
    cfg, position = run.cfg, run.position
    while position.step < run.total_steps and not run.stopped:
        order = epoch_order(len(run.train_tok), position.epoch, cfg)
        while position.batch_in_epoch < run.steps_per_epoch and position.step < run.total_steps:
            metrics = train_step(run, order)
            if metrics is None:  # stopped within the step
                break
            last_step = position.step == run.total_steps
            if run.valid_tok and ((cfg.eval_every and position.step % cfg.eval_every == 0) or last_step):
                metrics = StepMetrics(**metrics.to_dict(), **evaluate_step(run))
            run.last = metrics
            run.sink.metrics(position.step, metrics)
            if run.fused and position.step == 1 and (fallbacks := lean.fused_fallbacks()):
                run.sink.event("warn", f"fused_kernels: {', '.join(fallbacks)} did not compile and run the eager math "
                               "(same results, slower); the worker log says why", {"fused_kernels_fallbacks": fallbacks})
            if cfg.checkpoint_every is not None:
                wants_checkpoint = position.step % cfg.checkpoint_every == 0
            else:
                wants_checkpoint = position.batch_in_epoch == run.steps_per_epoch
            if wants_checkpoint and not last_step:  # the last step's checkpoint is written by finish()
                write_checkpoint(run, metrics)
            if should_pause is not None and not last_step and should_pause():
                if not wants_checkpoint:
                    write_checkpoint(run, metrics)
                run.stopped = True
                break
            if run.should_stop():
                run.stopped = True
                break
        if not run.stopped and position.batch_in_epoch == run.steps_per_epoch:
            position.epoch += 1
            position.batch_in_epoch = 0
    return finish(run)


def setup(job: TrainingJob, sink: Sink, should_stop: Callable[[], bool], resume_from: Path | None) -> TrainingRun:
    """Check everything that can be checked without the model (options, device, data), then build the model,
    optimizer and schedule, restored from `resume_from` if given."""
    started = time.time()
    device = pick_device()
    cfg = resolve_for_device(job.config, device)
    check_runtime(cfg, device.type)
    read_model_config(job.base_model_dir)  # fails early, with param="model", if the directory is not a model
    tokenizer = load_tokenizer(job.base_model_dir)
    train_tok, train_stats, valid_tok, valid_stats = prepare_data(job, tokenizer)
    sink.event("info", f"Training file: {train_stats.n_examples} examples, {train_stats.n_tokens} tokens "
               f"(mean {train_stats.mean_tokens:.0f}, p95 {train_stats.p95_tokens}, {train_stats.n_truncated} truncated)",
               {"train_stats": train_stats.to_dict(), "validation_stats": valid_stats.to_dict() if valid_stats else None})
    if train_stats.n_truncated:
        sink.event("warn", f"{train_stats.n_truncated} training examples were longer than max_seq_length={cfg.max_seq_length} and were truncated")
    total_steps = cfg.total_steps(len(train_tok))
    resumed_state = read_checkpoint_config(Path(resume_from)) if resume_from is not None else {}
    if resume_from is not None:
        cfg = _resumable_config(job.config, resumed_state["config"], device)

    # The seed is set before LoRA init so that adapters start the same.
    seed_everything(cfg.seed)
    longest = max(len(e.input_ids) for e in train_tok)
    # At most the configured tokens per pass, and no more than the pass's examples can hold at the longest length.
    examples_per_pass = cfg.batch_size if cfg.micro_batch_tokens is not None else cfg.micro_batch_size
    tokens_per_micro = min(cfg.max_tokens_per_micro_batch, examples_per_pass * longest)
    built: BuiltModel = build_model(job.base_model_dir, cfg, device=device, tokens_per_micro_batch=tokens_per_micro)
    optimizer = build_optimizer(built.model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    position = TrainerPosition(step=0, epoch=0, batch_in_epoch=0, trained_tokens=0)
    if resume_from is not None:
        load_adapter_weights(built.model, Path(resume_from))
        state = load_trainer_state(Path(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        position = TrainerPosition(**state["position"])
        restore_rng(state["rng"])
        sink.event("info", f"Resumed from {resume_from} at step {position.step}")
    fused = built.choices.fused_kernels
    sink.start(total_steps)
    sink.event("info", f"Model loaded: {built.trainable_parameters:,} trainable of {built.total_parameters:,} parameters, "
               f"quantization={cfg.quantization}, compute_dtype={cfg.compute_dtype}, attention={built.choices.attn_implementation}, "
               f"lean activations={'on' if cfg.lean_activations else 'off'}, fused kernels={'on' if fused else 'off'}, "
               f"checkpointing per layer: {built.plan_summary()}, device={device.type}",
               {"trainable_parameters": built.trainable_parameters, "gradient_checkpointing": built.gradient_checkpointing,
                **built.choices.to_dict(), "total_steps": total_steps})
    if device.type == "cuda":
        # Report the peak of training itself, not of loading (comparable with the memory estimate).
        torch.cuda.reset_peak_memory_stats(device)

    # fp16 needs loss scaling against gradient underflow; for bf16/fp32 the scaler is a no-op.
    amp_dtype = autocast_dtype(cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.compute_dtype == "fp16")
    built.model.train()
    # A resumed run starts from the checkpoint's metrics, so that a run with no step left still reports them.
    resumed_metrics: dict[str, float] = dict(resumed_state.get("metrics") or {})
    return TrainingRun(
        job=job, cfg=cfg, device=device, sink=sink, should_stop=should_stop, resume_from=resume_from, started=started,
        tokenizer=tokenizer, train_tok=train_tok, train_stats=train_stats, valid_tok=valid_tok, valid_stats=valid_stats,
        built=built, optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype, fused=fused,
        position=position, total_steps=total_steps, steps_per_epoch=cfg.steps_per_epoch(len(train_tok)),
        last=StepMetrics(**resumed_metrics) if resumed_metrics else None,
        last_valid={k: v for k, v in resumed_metrics.items() if k.startswith("valid_")},
        resumed_at_end=resume_from is not None and position.step >= total_steps,
    )


def _resumable_config(given: TrainingConfig, saved: dict[str, Any], device: torch.device) -> TrainingConfig:
    """The config a resumed run continues with: the checkpoint's compute dtype where the job left it 'auto'.
    Raises ConfigError if any other option differs from the checkpoint's."""
    cfg = resolve_for_device(given, device, earlier=saved)  # a resumed run keeps the dtype it began with
    check_runtime(cfg, device.type)
    if given.lean_activations == "auto":  # decided per device; the results are the same either way
        saved = {**saved, "lean_activations": cfg.lean_activations}
    if saved != cfg.resolved():
        changed = sorted(k for k in saved if saved.get(k) != cfg.resolved().get(k))
        raise ConfigError(f"cannot resume with different options: {changed}", param=changed[0] if changed else None)
    return cfg


def train_step(run: TrainingRun, order: list[int]) -> StepMetrics | None:
    """One optimizer step over the next `batch_size` examples of `order`, in micro-batches whose gradients add up
    to those of one big batch. Returns its metrics, or None if `should_stop()` interrupted it (nothing applied)."""
    cfg, position, optimizer, scaler = run.cfg, run.position, run.optimizer, run.scaler
    start = position.batch_in_epoch * cfg.batch_size
    step_examples = run.replicas.share([run.train_tok[i] for i in order[start : start + cfg.batch_size]])
    batches = list(micro_batches(step_examples, cfg, None, run.tokenizer.pad_token_id))
    totals = run.replicas.sum({"targets": sum(count_targets(b) for b in batches), "tokens": sum(count_tokens(b) for b in batches)})
    step_targets, step_tokens = int(totals["targets"]), int(totals["tokens"])
    t0 = time.perf_counter()
    loss_total, correct = 0.0, 0
    for batch in batches:
        if run.should_stop():
            run.stopped = True
            optimizer.zero_grad(set_to_none=True)
            return None
        loss_sum, _n, c = forward_loss(run.model, batch, run.device, run.amp_dtype, cfg.fused_cross_entropy)
        # Divide by the step's target count so accumulated gradients equal those of one big batch.
        scaler.scale(loss_sum / max(step_targets, 1)).backward()
        loss_total += float(loss_sum.detach())
        correct += c
    run.replicas.reduce_gradients(run.model.parameters())
    totals = run.replicas.sum({"loss": loss_total, "correct": correct})
    loss_total, correct = totals["loss"], int(totals["correct"])
    if not math.isfinite(loss_total):
        raise NonFiniteLossError(position.step + 1, cfg.compute_dtype)
    scaler.unscale_(optimizer)
    grad_norm = clip_and_norm(run.model, cfg.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    scaler.step(optimizer)  # skips the step (and lowers the scale) if fp16 gradients overflowed
    scaler.update()
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - t0

    position.step += 1
    position.batch_in_epoch += 1
    position.trained_tokens += step_tokens
    return StepMetrics(
        step=position.step,
        epoch=position.epoch + position.batch_in_epoch / run.steps_per_epoch,
        train_loss=loss_total / max(step_targets, 1),
        train_mean_token_accuracy=correct / max(step_targets, 1),
        learning_rate=lr,
        grad_norm=grad_norm,
        tokens=step_tokens,
        target_tokens=step_targets,
        tokens_per_second=step_tokens / seconds,
        step_seconds=seconds,
        peak_memory_bytes=peak_memory_bytes(run.device),  # of the step, before any evaluation
    )


def evaluate_step(run: TrainingRun) -> dict[str, float]:
    """Evaluate on the validation file after the current step, and report it."""
    run.last_valid = evaluate(run.model, run.valid_tok, run.cfg, run.device, run.tokenizer.pad_token_id)
    run.sink.event("info", f"Step {run.position.step}: valid_loss={run.last_valid['valid_loss']:.4f}", run.last_valid)
    return run.last_valid


def write_checkpoint(run: TrainingRun, metrics: StepMetrics) -> Path:
    """Save and verify a checkpoint of the current position, report it, and drop the oldest past keep_checkpoints.
    Only the main process writes (the others hold the same weights); they return where it writes."""
    cfg = run.cfg
    if not run.replicas.is_main:
        return Path(run.job.output_dir) / "checkpoints" / checkpoint_name(run.position.step)
    path = save_checkpoint(run.model, run.optimizer, run.scheduler, run.position,
                           Path(run.job.output_dir) / "checkpoints" / checkpoint_name(run.position.step), config=cfg.resolved(),
                           extra={"base_model": str(run.job.base_model_dir), "versions": versions(), "metrics": metrics.checkpoint_metrics()})
    if path not in run.checkpoints:
        run.checkpoints.append(path)
    run.sink.checkpoint(run.position.step, path, metrics)
    if cfg.keep_checkpoints is not None:
        for old in run.checkpoints[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        del run.checkpoints[: -cfg.keep_checkpoints]
    return path


def finish(run: TrainingRun) -> TrainResult:
    """The result of a stopped run, or: the final checkpoint, copied as the job's adapter, and the result file."""
    position, output_dir = run.position, Path(run.job.output_dir)
    final_train_loss = run.last.train_loss if run.last else None
    final_valid_loss = run.last_valid.get("valid_loss")
    valid_stats = run.valid_stats.to_dict() if run.valid_stats else None
    if run.stopped:
        run.sink.event("info", f"Stopped at step {position.step}")
        return TrainResult("stopped", position.step, run.total_steps, position.trained_tokens, final_train_loss, final_valid_loss,
                           None, run.checkpoints, run.train_stats.to_dict(), valid_stats, time.time() - run.started)
    # Resumed from the final checkpoint (the worker died before the job was marked done): it is the adapter, and it
    # is not written or reported again.
    if run.resumed_at_end:
        assert run.resume_from is not None
        final = Path(run.resume_from)
    else:
        final = write_checkpoint(run, run.last or StepMetrics(step=position.step))
    if not run.replicas.is_main:  # the main process writes the adapter and the result
        return TrainResult("succeeded", position.step, run.total_steps, position.trained_tokens, final_train_loss, final_valid_loss,
                           None, [], run.train_stats.to_dict(), valid_stats, time.time() - run.started)
    adapter_dir = output_dir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    shutil.copytree(final, adapter_dir, ignore=shutil.ignore_patterns("trainer_state.pt"))
    result = TrainResult("succeeded", position.step, run.total_steps, position.trained_tokens, final_train_loss, final_valid_loss,
                         adapter_dir, run.checkpoints, run.train_stats.to_dict(), valid_stats, time.time() - run.started)
    (output_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    run.sink.event("info", f"Training finished: {position.step} steps, {position.trained_tokens} tokens, "
                   f"final train_loss={_loss_or_na(result.final_train_loss)}", {"adapter_dir": str(adapter_dir)})
    return result


def _loss_or_na(value: float | None) -> str:
    """A loss to 4 decimals; "n/a" for a run that has none."""
    return "n/a" if value is None else f"{value:.4f}"


def clip_and_norm(model: Any, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
