"""The training loop as a recipe, the same for every method: setup, loop, evaluate, checkpoint, finish.

One call of `train(request, sink)` runs a whole job: `setup` validates the options and the data before loading
anything and builds the quantized model with LoRA into a `TrainingState`; the loop then runs optimizer steps
(`train_step`), evaluates (`evaluate_step`) and checkpoints (`write_checkpoint`); `finish` writes the adapter.
What the method decides (its data, batches, loss and metrics) is the job's objective
(`worker/training/objectives/`, chosen by `TrainingConfig.method`); the data order and micro-batching are
`worker/training/data.py`'s, seeding and the process's facts `worker/training/runtime.py`'s. Each optimizer step
takes `batch_size` units in micro-batches (gradient accumulation) of `micro_batch_size` units, or packed into
rows of at most `micro_batch_tokens` tokens; every micro-batch's loss sum is divided by the weight of the whole
step (SFT: its target tokens), so the accumulated gradients are those of one big batch.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from contract.metrics import StepMetrics
from contract.options import ConfigError, TrainingConfig
from worker.training import lean_activations
from worker.training.checkpoint import (
    TrainerPosition,
    checkpoint_name,
    load_adapter_weights,
    load_initial_adapter,
    load_trainer_state,
    read_checkpoint_config,
    restore_rng,
    save_checkpoint,
)
from worker.training.data import TokenStats, Unit, count_targets, count_tokens, epoch_order, load_tokenizer, micro_batches
from worker.training.model import BuiltModel, build_model, check_runtime, pick_device, read_model_config, resolve_for_device
from worker.training.objectives import Objective, build_objective
from worker.training.optim import build_optimizer, build_scheduler, clip_and_norm
from worker.training.parallel import Replicas
from worker.training.runtime import autocast_dtype, peak_memory_bytes, seed_everything, versions
from worker.training.sinks import NullSink, Sink


class NonFiniteLossError(RuntimeError):
    """A step's training loss was NaN or infinite: the run stops before the optimizer applies it."""

    def __init__(self, step: int, compute_dtype: str):
        super().__init__(f"the training loss of step {step} is not a finite number (compute_dtype={compute_dtype}); "
                         "try a lower learning_rate, or compute_dtype='fp32'")
        self.step = step


@dataclass
class TrainingRequest:
    """What to train: a local base model directory, JSONL files, options and where to write."""

    base_model_dir: Path
    train_file: Path
    output_dir: Path
    config: TrainingConfig = field(default_factory=TrainingConfig)
    validation_file: Path | None = None
    # An adapter directory (peft layout) whose weights the LoRA starts from instead of its fresh init: the fine-tuned
    # model a job continues from. It must have the config's LoRA shape; its files are only read.
    initial_adapter: Path | None = None


@dataclass
class TrainingResult:
    """How a run ended: what `train` returns and, for a finished run, OUTPUT/result.json."""

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


@torch.no_grad()
def evaluate(model: Any, objective: Objective, units: Sequence[Unit], cfg: TrainingConfig, device: torch.device,
             pad_token_id: int) -> dict[str, float]:
    """The objective's loss and metrics over `units` (the validation file), as `valid_loss` and `valid_<name>`."""
    was_training = model.training
    model.eval()
    loss_total, weight, metric_sums = 0.0, 0, {}
    for batch in micro_batches(units, cfg, cfg.eval_batch_size, lambda row: objective.collate(row, pad_token_id)):
        out = objective.loss(model, batch, device, autocast_dtype(cfg))
        loss_total += float(out.loss_sum)
        weight += objective.weight(batch)
        _add(metric_sums, out.metric_sums)
    if was_training:
        model.train()
    return {"valid_loss": loss_total / max(weight, 1), **{f"valid_{name}": total / max(weight, 1) for name, total in metric_sums.items()}}


def _add(totals: dict[str, float], values: dict[str, float]) -> None:
    for name, value in values.items():
        totals[name] = totals.get(name, 0.0) + float(value)


# --- the recipe: setup, step, evaluate, checkpoint, finish ------------------------------------------

@dataclass
class TrainingState:
    """One job's training state, built by `setup` and advanced by `train_step`: what the loop reads and changes."""

    request: TrainingRequest
    cfg: TrainingConfig  # the job's options decided for this device
    device: torch.device
    sink: Sink
    should_stop: Callable[[], bool]
    resume_from: Path | None
    started: float
    objective: Objective  # the method: data, batches, loss and metrics
    tokenizer: Any
    train_units: Sequence[Unit]
    train_stats: TokenStats
    valid_units: Sequence[Unit]
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


def train(request: TrainingRequest, sink: Sink | None = None, should_stop: Callable[[], bool] | None = None,
          resume_from: Path | None = None, should_pause: Callable[[], bool] | None = None,
          replicas: Replicas | None = None) -> TrainingResult:
    """Run one training job to the end, or until `should_stop()` returns True (checked between micro-batches), or
    `should_pause()` does (checked after each step but the last: the run then writes a checkpoint of that step, if
    it has none, and stops; resumed from it, the run goes on as if never paused). `replicas`: the processes that
    share each step (worker/training/distributed.py); only the main one writes and reports."""
    run = setup(request, sink or NullSink(), should_stop or (lambda: False), resume_from)
    if replicas is not None:
        run.replicas = replicas
    cfg, position = run.cfg, run.position
    while position.step < run.total_steps and not run.stopped:
        order = epoch_order(len(run.train_units), position.epoch, cfg)
        while position.batch_in_epoch < run.steps_per_epoch and position.step < run.total_steps:
            metrics = train_step(run, order)
            if metrics is None:  # stopped within the step
                break
            last_step = position.step == run.total_steps
            if run.valid_units and ((cfg.eval_every and position.step % cfg.eval_every == 0) or last_step):
                metrics = StepMetrics(**metrics.to_dict(), **evaluate_step(run))
            run.last = metrics
            run.sink.metrics(position.step, metrics)
            if run.fused and position.step == 1 and (fallbacks := lean_activations.fused_fallbacks()):
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


def setup(request: TrainingRequest, sink: Sink, should_stop: Callable[[], bool], resume_from: Path | None) -> TrainingState:
    """Check everything that can be checked without the model (options, device, data), then build the model,
    optimizer and schedule, restored from `resume_from` if given."""
    started = time.time()
    device = pick_device()
    cfg = resolve_for_device(request.config, device)
    check_runtime(cfg, device.type)
    read_model_config(request.base_model_dir)  # fails early, with param="model", if the directory is not a model
    objective = build_objective(cfg)
    tokenizer = load_tokenizer(request.base_model_dir)
    train_units, train_stats = objective.load(request.train_file, tokenizer, role="training")
    valid_units, valid_stats = objective.load(request.validation_file, tokenizer, role="validation") if request.validation_file else ([], None)
    sink.event("info", f"Training file: {train_stats.n_examples} examples, {train_stats.n_tokens} tokens "
               f"(mean {train_stats.mean_tokens:.0f}, p95 {train_stats.p95_tokens}, {train_stats.n_truncated} truncated)",
               {"train_stats": train_stats.to_dict(), "validation_stats": valid_stats.to_dict() if valid_stats else None})
    if train_stats.n_truncated:
        sink.event("warn", f"{train_stats.n_truncated} training examples were longer than max_seq_length={cfg.max_seq_length} and were truncated")
    total_steps = cfg.total_steps(len(train_units))
    resumed_state = read_checkpoint_config(Path(resume_from)) if resume_from is not None else {}
    if resume_from is not None:
        cfg = _resumable_config(request.config, resumed_state["config"], device)

    # The seed is set before LoRA init so that adapters start the same.
    seed_everything(cfg.seed)
    longest = max(unit.n_tokens for unit in train_units)
    # At most the configured tokens per pass, and no more than the pass's examples can hold at the longest length.
    examples_per_pass = cfg.batch_size if cfg.micro_batch_tokens is not None else cfg.micro_batch_size
    tokens_per_micro = min(cfg.max_tokens_per_micro_batch, examples_per_pass * longest)
    built: BuiltModel = build_model(request.base_model_dir, cfg, device=device, tokens_per_micro_batch=tokens_per_micro)
    if request.initial_adapter is not None and resume_from is None:  # a resumed run's checkpoint holds its own weights
        copied = load_initial_adapter(built.model, Path(request.initial_adapter))
        sink.event("info", f"LoRA weights start from the adapter of the model the job continues from ({copied} tensors)",
                   {"initial_adapter_tensors": copied})
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
        objective.load_state_dict(state.get("objective", {}))
        sink.event("info", f"Resumed from {resume_from} at step {position.step}")
    fused = built.choices.fused_kernels
    sink.start(total_steps)
    sink.event("info", f"Model loaded: {built.trainable_parameters:,} trainable of {built.total_parameters:,} parameters, "
               f"quantization={cfg.quantization}, compute_dtype={cfg.compute_dtype}, attention={built.choices.attn_implementation}, "
               f"lean activations={'on' if cfg.lean_activations else 'off'}, fused kernels={'on' if fused else 'off'}, "
               f"checkpointing per layer: {built.plan_summary()}, device={device.type}",
               {"trainable_parameters": built.trainable_parameters, "gradient_checkpointing": built.gradient_checkpointing,
                **built.choices.to_dict(), "total_steps": total_steps})
    if built.not_lean:
        sink.event("warn", f"lean_activations: {len(built.not_lean)} modules run their own forward, not the lean one "
                   f"({', '.join(built.not_lean[:3])}{', ...' if len(built.not_lean) > 3 else ''}): slower, and more memory "
                   "than the plan counted; worker/training/lean_activations.py lists the classes it knows", {"not_lean": list(built.not_lean)})
    if device.type == "cuda":
        # Report the peak of training itself, not of loading (comparable with the memory estimate).
        torch.cuda.reset_peak_memory_stats(device)

    # fp16 needs loss scaling against gradient underflow; for bf16/fp32 the scaler is a no-op.
    amp_dtype = autocast_dtype(cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.compute_dtype == "fp16")
    built.model.train()
    # A resumed run starts from the checkpoint's metrics, so that a run with no step left still reports them.
    resumed_metrics: dict[str, float] = dict(resumed_state.get("metrics") or {})
    run = TrainingState(
        request=request, cfg=cfg, device=device, sink=sink, should_stop=should_stop, resume_from=resume_from, started=started,
        objective=objective, tokenizer=tokenizer, train_units=train_units, train_stats=train_stats,
        valid_units=valid_units, valid_stats=valid_stats,
        built=built, optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype, fused=fused,
        position=position, total_steps=total_steps, steps_per_epoch=cfg.steps_per_epoch(len(train_units)),
        last=StepMetrics(**resumed_metrics) if resumed_metrics else None,
        last_valid={k: v for k, v in resumed_metrics.items() if k.startswith("valid_")},
        resumed_at_end=resume_from is not None and position.step >= total_steps,
    )
    if resume_from is None:
        objective.prepare(run)  # e.g. a reference pass; a resumed run restored the objective's state instead
    return run


def _resumable_config(given: TrainingConfig, saved: dict[str, Any], device: torch.device) -> TrainingConfig:
    """The config a resumed run continues with: the checkpoint's compute dtype where the job left it 'auto'.
    Raises ConfigError if any other option differs from the checkpoint's. An option newer than the checkpoint (such
    as `method`) counts with its default, the behaviour the checkpoint was trained with."""
    saved = {**{k: v for k, v in TrainingConfig().resolved().items() if k not in saved}, **saved}
    cfg = resolve_for_device(given, device, earlier=saved)  # a resumed run keeps the dtype it began with
    check_runtime(cfg, device.type)
    if given.lean_activations == "auto":  # decided per device; the results are the same either way
        saved = {**saved, "lean_activations": cfg.lean_activations}
    saved = {**saved, "n_gpus": cfg.n_gpus}  # a checkpoint resumes on any number of GPUs: the losses are the same
    if saved != cfg.resolved():
        changed = sorted(k for k in saved if saved.get(k) != cfg.resolved().get(k))
        raise ConfigError(f"cannot resume with different options: {changed}", param=changed[0] if changed else None)
    return cfg


def train_step(run: TrainingState, order: list[int]) -> StepMetrics | None:
    """One optimizer step over the next `batch_size` units of `order`, in micro-batches whose gradients add up
    to those of one big batch. Returns its metrics, or None if `should_stop()` interrupted it (nothing applied)."""
    cfg, position, optimizer, scaler, objective = run.cfg, run.position, run.optimizer, run.scaler, run.objective
    start = position.batch_in_epoch * cfg.batch_size
    step_units = run.replicas.share([run.train_units[i] for i in order[start : start + cfg.batch_size]])
    batches = list(micro_batches(step_units, cfg, None, lambda row: objective.collate(row, run.tokenizer.pad_token_id)))
    # The whole step's weight and tokens: summed over the processes that share the step (one by default).
    totals = run.replicas.sum({"weight": sum(objective.weight(b) for b in batches), "tokens": sum(count_tokens(b) for b in batches),
                               "targets": sum(count_targets(b) for b in batches)})
    step_weight, step_tokens, step_targets = totals["weight"], int(totals["tokens"]), int(totals["targets"])
    t0 = time.perf_counter()
    loss_total, metric_sums = 0.0, {}
    for batch in batches:
        if run.should_stop():
            run.stopped = True
            optimizer.zero_grad(set_to_none=True)
            return None
        out = objective.loss(run.model, batch, run.device, run.amp_dtype)
        # Divide by the step's weight so accumulated gradients equal those of one big batch.
        scaler.scale(out.loss_sum / max(step_weight, 1)).backward()
        loss_total += float(out.loss_sum.detach())
        _add(metric_sums, out.metric_sums)
    run.replicas.reduce_gradients(run.model.parameters())
    metric_sums = run.replicas.sum({"loss": loss_total, **metric_sums})
    loss_total = metric_sums.pop("loss")
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
        train_loss=loss_total / max(step_weight, 1),
        **{f"train_{name}": total / max(step_weight, 1) for name, total in metric_sums.items()},
        learning_rate=lr,
        grad_norm=grad_norm,
        tokens=step_tokens,
        target_tokens=step_targets,
        tokens_per_second=step_tokens / seconds,
        step_seconds=seconds,
        peak_memory_bytes=peak_memory_bytes(run.device),  # of the step, before any evaluation
    )


def evaluate_step(run: TrainingState) -> dict[str, float]:
    """Evaluate on the validation file after the current step, and report it."""
    run.last_valid = evaluate(run.model, run.objective, run.valid_units, run.cfg, run.device, run.tokenizer.pad_token_id)
    run.sink.event("info", f"Step {run.position.step}: valid_loss={run.last_valid['valid_loss']:.4f}", run.last_valid)
    return run.last_valid


def write_checkpoint(run: TrainingState, metrics: StepMetrics) -> Path:
    """Save and verify a checkpoint of the current position, report it, and drop the oldest past keep_checkpoints.
    Only the main process writes (the others hold the same weights); they return where it writes."""
    cfg = run.cfg
    if not run.replicas.is_main:
        return Path(run.request.output_dir) / "checkpoints" / checkpoint_name(run.position.step)
    path = save_checkpoint(run.model, run.optimizer, run.scheduler, run.position,
                           Path(run.request.output_dir) / "checkpoints" / checkpoint_name(run.position.step), config=cfg.resolved(),
                           objective_state=run.objective.state_dict(), extra={"base_model": str(run.request.base_model_dir),
                                  "initial_adapter": str(run.request.initial_adapter) if run.request.initial_adapter else None, "versions": versions(), "metrics": metrics.checkpoint_metrics()})
    if path not in run.checkpoints:
        run.checkpoints.append(path)
    run.sink.checkpoint(run.position.step, path, metrics)
    if cfg.keep_checkpoints is not None:
        for old in run.checkpoints[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        del run.checkpoints[: -cfg.keep_checkpoints]
    return path


def finish(run: TrainingState) -> TrainingResult:
    """The result of a stopped run, or: the final checkpoint, copied as the job's adapter, and the result file."""
    position, output_dir = run.position, Path(run.request.output_dir)
    final_train_loss = run.last.train_loss if run.last else None
    final_valid_loss = run.last_valid.get("valid_loss")
    valid_stats = run.valid_stats.to_dict() if run.valid_stats else None
    if run.stopped:
        run.sink.event("info", f"Stopped at step {position.step}")
        return TrainingResult("stopped", position.step, run.total_steps, position.trained_tokens, final_train_loss, final_valid_loss,
                           None, run.checkpoints, run.train_stats.to_dict(), valid_stats, time.time() - run.started)
    # Resumed from the final checkpoint (the worker died before the job was marked done): it is the adapter, and it
    # is not written or reported again.
    if run.resumed_at_end:
        assert run.resume_from is not None
        final = Path(run.resume_from)
    else:
        final = write_checkpoint(run, run.last or StepMetrics(step=position.step))
    if not run.replicas.is_main:  # the main process writes the adapter and the result
        return TrainingResult("succeeded", position.step, run.total_steps, position.trained_tokens, final_train_loss, final_valid_loss,
                              None, [], run.train_stats.to_dict(), valid_stats, time.time() - run.started)
    adapter_dir = output_dir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    shutil.copytree(final, adapter_dir, ignore=shutil.ignore_patterns("trainer_state.pt"))
    result = TrainingResult("succeeded", position.step, run.total_steps, position.trained_tokens, final_train_loss, final_valid_loss,
                         adapter_dir, run.checkpoints, run.train_stats.to_dict(), valid_stats, time.time() - run.started)
    (output_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    run.sink.event("info", f"Training finished: {position.step} steps, {position.trained_tokens} tokens, "
                   f"final train_loss={_loss_or_na(result.final_train_loss)}", {"adapter_dir": str(adapter_dir)})
    return result


def _loss_or_na(value: float | None) -> str:
    """A loss to 4 decimals; "n/a" for a run that has none."""
    return "n/a" if value is None else f"{value:.4f}"
