"""The method seam: what a training method gives the recipe (worker/training/trainer.py).

The recipe is the same for every method: it loads the data through the objective, runs optimizer steps over
micro-batches, evaluates, checkpoints and writes the adapter. What a method decides is here, in one object:

- `load`: a file's training units (SFT: one tokenized example; a pair-based method: a chosen and a rejected
  completion of one prompt, kept together so that they land in the same micro-batch) and their token counts.
  A unit has `n_tokens`, the tokens it puts into a micro-batch (what packing and the memory plan count).
- `collate`: a micro-batch of units as tensors. Besides what its `loss` needs, a batch holds `input_ids`, `labels`
  (IGNORE_INDEX where nothing is trained) and, when padded, `attention_mask`: the recipe counts a step's tokens and
  target tokens from them (`data.count_tokens`, `data.count_targets`).
- `weight`: what a micro-batch's loss sum is a sum over (SFT: its target tokens; DPO: its pairs). The recipe
  sums it over a step's micro-batches before the first backward and divides every loss sum by the step's
  total, so that accumulated gradients equal those of one big batch.
- `loss`: a micro-batch in; its loss sum (with autograd) and its named metric sums out. The recipe reports
  `train_<name>` (and `valid_<name>` when evaluating) as the step's sum divided by the step's weight.
- `prepare`: runs once before step 1 of a fresh run (a reference pass over the training data, say);
  `state_dict`/`load_state_dict`: what the objective keeps across a resume, stored in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from worker.training import attention
from worker.training.data import TokenStats, Unit

if TYPE_CHECKING:
    from worker.training.trainer import TrainingState

Batch = dict[str, torch.Tensor]
FileRole = Literal["training", "validation"]


@dataclass
class LossOutput:
    """What `Objective.loss` returns for one micro-batch."""

    loss_sum: torch.Tensor  # a scalar with autograd: the loss summed over the micro-batch's `weight`
    metric_sums: dict[str, float]  # named sums over the same weight (SFT: {"mean_token_accuracy": tokens right})


class Objective(Protocol):
    """A training method (`TrainingConfig.method`): its data, its batches and its loss. See the module docstring."""

    method: str

    def load(self, path: Path, tokenizer: Any, *, role: FileRole) -> tuple[Sequence[Unit], TokenStats]:
        """Validate and tokenize a file (raises contract.data_format.DataValidationError with every fault)."""
        ...

    def collate(self, units: Sequence[Unit], pad_token_id: int) -> Batch: ...

    def weight(self, batch: Batch) -> int: ...

    def loss(self, model: Any, batch: Batch, device: torch.device, amp_dtype: torch.dtype | None) -> LossOutput: ...

    def prepare(self, run: TrainingState) -> None:
        """Before step 1 of a run that did not resume (a resumed one gets `load_state_dict` instead)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values to keep in each checkpoint (loaded with torch.load(weights_only=True))."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def model_inputs(model: Any, batch: Batch, device: torch.device) -> tuple[Batch, dict[str, Any]]:
    """A micro-batch moved to the device, and the extra keyword arguments of the model call: with varlen attention
    the example boundaries of a packed row, computed here once for all layers."""
    extra: dict[str, Any] = {}
    if getattr(model.config, "_attn_implementation", None) == attention.NAME and "attention_mask" not in batch:
        extra = attention.varlen_kwargs(batch["position_ids"], device)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}, extra
