"""Supervised fine-tuning (method "supervised"): next-token cross-entropy on the target tokens of each example.

A unit is one tokenized example (`data.TokenizedExample`: chat, prompt/completion or text, with its loss mask);
a micro-batch's weight is its target-token count, so a step's loss is the mean over all target tokens of the
step, not the mean of per-micro-batch means (which would weigh a token of a short micro-batch more than one of
a long one). Its one metric is the share of target tokens predicted right (`mean_token_accuracy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from contract.options import TrainingConfig
from worker.training.data import IGNORE_INDEX, TokenizedExample, TokenStats, collate, count_targets, load_tokenized
from worker.training.losses import linear_cross_entropy
from worker.training.objectives.base import Batch, FileRole, LossOutput, model_inputs
from worker.training.runtime import autocast


class SupervisedObjective:
    method = "supervised"

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg

    def load(self, path: Path, tokenizer: Any, *, role: FileRole) -> tuple[list[TokenizedExample], TokenStats]:
        return load_tokenized(path, tokenizer, self.cfg, role=role)

    def collate(self, units: Sequence[TokenizedExample], pad_token_id: int) -> Batch:
        return collate(list(units), self.cfg, pad_token_id)

    def weight(self, batch: Batch) -> int:
        return count_targets(batch)

    def loss(self, model: Any, batch: Batch, device: torch.device, amp_dtype: torch.dtype | None) -> LossOutput:
        loss_sum, _n, correct = forward_loss(model, batch, device, amp_dtype, self.cfg.fused_cross_entropy)
        return LossOutput(loss_sum, {"mean_token_accuracy": correct})

    def prepare(self, run: Any) -> None:
        """Nothing to compute before step 1."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing kept across a resume."""


def forward_loss(model: Any, batch: Batch, device: torch.device,
                 amp_dtype: torch.dtype | None = None, fused: bool = False) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy over the target tokens of a micro-batch.

    Returns (loss_sum, n_targets, n_correct). The caller divides by the target count of the whole step.
    `use_cache=False` matters beyond memory: with a KV cache, transformers does not derive the per-example
    attention mask of a packed row from its position ids, and packed examples would attend to each other.
    fused: the loss comes from the hidden states through `losses.linear_cross_entropy` (no full logits)."""
    batch, extra = model_inputs(model, batch, device)
    labels = batch.pop("labels")
    if fused:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Row t predicts label t+1; the last position of a row predicts nothing.
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1).reshape(-1)
        with autocast(device, amp_dtype):
            hidden = base.model(**batch, use_cache=False, **extra).last_hidden_state
            head = base.get_output_embeddings()
            loss_sum, n_targets, n_correct = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head.weight, targets)
        return loss_sum, int(n_targets), int(n_correct)
    with autocast(device, amp_dtype):
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
