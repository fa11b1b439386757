"""What the engine reports after each optimizer step: `StepMetrics`, one typed record from the loop to the rows
and the wire (`GET /v1/fine_tuning/jobs/{id}/metrics`).

One rule for numbers that are not finite (a diverged loss, an fp16 gradient overflow): they become None here, at
the boundary, so no reader filters them again. A record holds the fields its step reported; the others (the
validation metrics of a step without evaluation) are left out of `to_dict()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The metric names of an OpenAI checkpoint object (`FineTuningJobCheckpoint.metrics`), in that order.
CHECKPOINT_METRIC_KEYS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")


class StepMetrics(BaseModel):
    """The metrics of one optimizer step (and its evaluation, if it ran one)."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(description="Optimizer steps done.")
    train_loss: float | None = Field(None, description="Mean cross-entropy per target token of the step.")
    train_mean_token_accuracy: float | None = Field(None, description="Share of target tokens predicted right.")
    valid_loss: float | None = Field(None, description="Mean loss on the validation file (steps that evaluated).")
    valid_mean_token_accuracy: float | None = Field(None, description="Token accuracy on the validation file.")
    train_rewards_chosen: float | None = Field(None, description="dpo: mean over the step's pairs of the reward of the preferred answers (TRL's rewards/chosen).")
    train_rewards_rejected: float | None = Field(None, description="dpo: mean over the step's pairs of the reward of the non-preferred answers (TRL's rewards/rejected).")
    train_rewards_margins: float | None = Field(None, description="dpo: mean over the step's pairs of the preferred minus non-preferred reward (TRL's rewards/margins).")
    train_rewards_accuracies: float | None = Field(None, description="dpo: mean over the step's pairs of the share of pairs whose preferred answer has the higher reward (TRL's rewards/accuracies).")
    train_logps_chosen: float | None = Field(None, description="dpo: mean over the step's pairs of the summed log-prob of the preferred answer (TRL's logps/chosen).")
    train_logps_rejected: float | None = Field(None, description="dpo: mean over the step's pairs of the summed log-prob of the non-preferred answer (TRL's logps/rejected).")
    valid_rewards_chosen: float | None = Field(None, description="dpo: mean over the validation pairs of the reward of the preferred answers (TRL's rewards/chosen).")
    valid_rewards_rejected: float | None = Field(None, description="dpo: mean over the validation pairs of the reward of the non-preferred answers (TRL's rewards/rejected).")
    valid_rewards_margins: float | None = Field(None, description="dpo: mean over the validation pairs of the preferred minus non-preferred reward (TRL's rewards/margins).")
    valid_rewards_accuracies: float | None = Field(None, description="dpo: mean over the validation pairs of the share of pairs whose preferred answer has the higher reward (TRL's rewards/accuracies).")
    valid_logps_chosen: float | None = Field(None, description="dpo: mean over the validation pairs of the summed log-prob of the preferred answer (TRL's logps/chosen).")
    valid_logps_rejected: float | None = Field(None, description="dpo: mean over the validation pairs of the summed log-prob of the non-preferred answer (TRL's logps/rejected).")
    epoch: float | None = Field(None, description="Epochs done, fractional.")
    learning_rate: float | None = Field(None, description="Learning rate the step used.")
    grad_norm: float | None = Field(None, description="Global gradient norm before clipping.")
    tokens: int | None = Field(None, description="Tokens in the step.")
    target_tokens: int | None = Field(None, description="Tokens the loss was computed on.")
    tokens_per_second: float | None = Field(None, description="Throughput of the step.")
    step_seconds: float | None = Field(None, description="Wall time of the step.")
    peak_memory_bytes: int | None = Field(None, description="Peak GPU memory (CUDA), else the process's peak resident memory.")

    @field_validator("*", mode="before")
    @classmethod
    def _finite_or_none(cls, value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    def to_dict(self) -> dict[str, Any]:
        """The fields this step reported (None where a number was not finite)."""
        return self.model_dump(exclude_unset=True)

    def checkpoint_metrics(self) -> dict[str, float]:
        """The metrics of an OpenAI checkpoint object: its keys that hold a number, as floats."""
        return finite_floats(self.to_dict(), CHECKPOINT_METRIC_KEYS)


def finite_floats(values: Mapping[str, Any], keys: Iterable[str] | None = None) -> dict[str, float]:
    """The entries of `values` (those of `keys`, in that order, if given) that hold a finite number, as floats:
    what a checkpoint object's `metrics` may hold."""
    names = values.keys() if keys is None else keys
    return {k: float(values[k]) for k in names if _is_finite_number(values.get(k))}


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
