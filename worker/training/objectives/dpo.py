"""Preference tuning (method "dpo"): DPO and its variants on pairs of a preferred and a non-preferred answer.

A unit is one pair (`preference.TokenizedPair`: both answers after the same prompt, truncated together); a
micro-batch holds whole pairs, chosen rows then rejected rows, so a pair's two answers always go through the same
forward (`micro_batch_tokens` counts both). A micro-batch's weight is its pair count: the step's loss is the mean
over its pairs. The loss and its variants are in `worker/training/preference.py`; the per-sequence log-probs come
from the chunked output head, so no full-vocabulary logits are held.

The reference (sigmoid, ipo) is the policy at initialisation: `prepare` computes every pair's log-probs once, in
eval mode and without gradients, before step 1. A job on a base runs it with the adapter disabled (a new adapter
starts as the identity, so that is the policy at initialisation at the cost of the frozen base alone). A job that
continues from a fine-tuned model (`TrainingRequest.initial_adapter`) runs it with the adapter on: its reference is
that model, not the bare base (the mistake of LLaMA-Factory #913). They are kept in every checkpoint
(`state_dict`), so a resumed job reuses them instead of computing them from a model that has moved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from contract.data_format import DataFault, DataValidationError, load_examples
from contract.options import TrainingConfig
from worker.training.data import TokenStats, micro_batches
from worker.training.objectives.base import Batch, FileRole, LossOutput
from worker.training.preference import (
    PairStats,
    TokenizedPair,
    collate_pairs,
    loss_sum,
    needs_reference,
    reward_sums,
    sequence_log_probs,
    split_pairs,
    tokenize_pairs,
)

if TYPE_CHECKING:
    from worker.training.trainer import TrainingState

PAIR_INDEX = "pair_index"  # a batch key: which pairs (of which file) the rows are, to find their reference log-probs
ROLE_CODE = {"training": 0, "validation": 1}


class DpoObjective:
    method = "dpo"

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        # Reference log-probs per file: [n_pairs, 2] (chosen, rejected), fp32 on the CPU.
        self.reference: dict[str, torch.Tensor] = {}
        self.pair_stats: dict[str, PairStats] = {}

    def load(self, path: Path, tokenizer: Any, *, role: FileRole) -> tuple[list[TokenizedPair], TokenStats]:
        examples = load_examples(path, min_examples=1, role=role) if role == "validation" else load_examples(path, role=role)
        wrong = [e.line for e in examples if e.format != "preference"]
        if wrong:
            raise DataValidationError([DataFault(line=None, code="invalid_file_format", message=(
                f"a 'dpo' job needs preference pairs ({{input, preferred_output, non_preferred_output}}); "
                f"{len(wrong)} line(s) hold supervised examples, the first on line {wrong[0]}"))], role=role)
        pairs, stats = tokenize_pairs(tokenizer, examples, max_seq_length=self.cfg.max_seq_length)
        if not pairs:
            raise DataValidationError([DataFault(line=None, code="invalid_file_format", message=(
                f"no pair has an answer token left within max_seq_length={self.cfg.max_seq_length}"))], role=role)
        self.pair_stats[role] = stats
        units = [replace(pair, index=ROLE_CODE[role] << 32 | i) for i, pair in enumerate(pairs)]
        lengths = sorted(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs)
        return units, TokenStats(
            n_examples=len(pairs), n_tokens=stats.n_tokens,
            n_target_tokens=sum(p.chosen.n_target_tokens + p.rejected.n_target_tokens for p in pairs),
            mean_tokens=stats.n_tokens / len(pairs), p95_tokens=lengths[-(-95 * len(lengths) // 100) - 1], max_tokens=lengths[-1],
            n_truncated=stats.n_truncated, n_without_targets=stats.n_dropped)

    def collate(self, units: Sequence[TokenizedPair], pad_token_id: int) -> Batch:
        batch = collate_pairs(list(units), pad_token_id)
        batch[PAIR_INDEX] = torch.tensor([u.index for u in units], dtype=torch.long)
        return batch

    def weight(self, batch: Batch) -> int:
        return int(batch[PAIR_INDEX].numel())

    def loss(self, model: Any, batch: Batch, device: torch.device, amp_dtype: torch.dtype | None) -> LossOutput:
        batch = dict(batch)
        index = batch.pop(PAIR_INDEX)
        policy = split_pairs(*sequence_log_probs(model, batch, device, amp_dtype))
        reference = self._reference(index, policy) if needs_reference(self.cfg.loss_type) else None
        out = loss_sum(policy, reference, loss_type=self.cfg.loss_type, beta=self.cfg.beta, simpo_gamma=self.cfg.simpo_gamma,
                       rpo_alpha=self.cfg.rpo_alpha)
        return LossOutput(out, reward_sums(policy, reference, loss_type=self.cfg.loss_type, beta=self.cfg.beta))

    def _reference(self, index: torch.Tensor, policy: Any) -> Any:
        rows = torch.stack([self.reference[_role(int(i))][int(i) & 0xFFFFFFFF] for i in index]).to(policy.chosen.device)
        return replace(policy, chosen=rows[:, 0], rejected=rows[:, 1])

    def prepare(self, run: TrainingState) -> None:
        """Report dropped pairs, and compute the reference log-probs of every pair once (the policy at init)."""
        for role, stats in self.pair_stats.items():
            if stats.n_dropped:
                run.sink.event("warn", f"{stats.n_dropped} {role} pair(s) had no answer token left within "
                               f"max_seq_length={self.cfg.max_seq_length} and were dropped", {"dropped_pairs": stats.n_dropped, "file": role})
        if not needs_reference(self.cfg.loss_type):
            return
        model = run.model
        was_training = model.training
        model.eval()
        # Disabling the adapter gives the policy at initialisation only for a fresh adapter (the identity).
        from_adapter = run.request.initial_adapter is not None
        disabled = model.disable_adapter() if hasattr(model, "disable_adapter") and not from_adapter else contextlib.nullcontext()
        with torch.no_grad(), disabled:
            for role, units in (("training", run.train_units), ("validation", run.valid_units)):
                if not units:
                    continue
                out = torch.empty(len(units), 2, dtype=torch.float32)
                # Grouped as evaluation groups (eval_batch_size, else as in training, micro_batch_tokens included), so
                # the pass holds no more tokens than the memory estimate's no-grad pass counts.
                for batch in micro_batches(units, self.cfg, self.cfg.eval_batch_size, lambda row: self.collate(row, run.tokenizer.pad_token_id)):
                    rows = batch.pop(PAIR_INDEX) & 0xFFFFFFFF
                    pairs = split_pairs(*sequence_log_probs(model, batch, run.device, run.amp_dtype))
                    out[rows] = torch.stack([pairs.chosen, pairs.rejected], dim=1).float().cpu()
                self.reference[role] = out
        model.train(was_training)
        which = "the model the job continues from, its adapter on" if from_adapter else "adapter disabled"
        run.sink.event("info", f"Reference log-probs computed (the policy at initialisation, {which})",
                       {"reference_pairs": {role: len(t) for role, t in self.reference.items()}})

    def state_dict(self) -> dict[str, Any]:
        return {f"reference_{role}": tensor for role, tensor in self.reference.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = {key.removeprefix("reference_"): tensor for key, tensor in state.items() if key.startswith("reference_")}


def _role(index: int) -> str:
    return "validation" if index >> 32 else "training"
