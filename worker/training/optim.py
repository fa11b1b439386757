"""Optimizer and learning-rate schedule for the LoRA parameters."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch

from contract.options import TrainingConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    classes = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }
    with warnings.catch_warnings():
        # On the CPU bitsandbytes falls back to unpaged state and says so; that is expected there.
        warnings.filterwarnings("ignore", message=".*paged.*", category=UserWarning)
        return classes[cfg.optimizer](params, **kwargs)


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, *, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for the optimizer step `step` (0-based). Hand-written rather than
    `transformers.get_scheduler`, whose warm-up starts at 0: the decay is the same, the warm-up is not."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)  # never 0: a step at lr 0 would be wasted
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total_steps, warmup=warmup, kind=cfg.lr_scheduler)
    )


def clip_and_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm of the trained parameters to `max_norm` (0: no clipping); returns the norm before."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
