"""The preference losses (DPO and its variants) on per-sequence log-probs, and their reward metrics.

Every function works on one pass's pairs: `chosen` and `rejected` are the summed log-probs of each pair's two
answers under the policy (shape [P], with autograd), `*_tokens` their target-token counts, and `ref_*` the same
sums under the reference (the policy at initialisation), computed once before training. The formulas, by
`loss_type` (beta is OpenAI's `beta`):

- sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta * ((c - ref_c) - (r - ref_r)))
- ipo (Azar et al. 2023, length-normalised as TRL does): ((c - ref_c)/|c| - (r - ref_r)/|r| - 1/(2 beta))^2
- simpo (Meng et al. 2024, reference-free): -log sigmoid(beta * (c/|c| - r/|r|) - simpo_gamma)
- orpo (Hong et al. 2024, reference-free): NLL(chosen) - beta * log sigmoid(log odds(c) - log odds(r)), with
  odds(y) = P/(1 - P), P = exp(mean token log-prob); beta is the paper's lambda. Its NLL term is the chosen
  answer's length-normalised NLL, the same term that `rpo_alpha` adds to the other loss types.

A pair's loss is its term above plus rpo_alpha times the chosen answer's NLL divided by its length (RPO, Pang et
al. 2024, eq. 2; TRL's `loss_type=["sigmoid", "sft"]` averages the NLL over the batch's tokens instead, which
weighs a long answer more); a step's loss is the mean over its pairs, so micro-batches of whole pairs add up to
one big batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from contract.data_format import Example
from worker.training.data import IGNORE_INDEX, TokenizedExample, collate_padded, tokenize_example
from worker.training.losses import linear_token_log_probs

LOSS_TYPES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class PairLogProbs:
    """Summed log-probs of the pairs' chosen and rejected answers, and their target-token counts ([P] each)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def needs_reference(loss_type: str) -> bool:
    return loss_type not in REFERENCE_FREE


def pair_losses(policy: PairLogProbs, reference: PairLogProbs | None, *, loss_type: str, beta: float,
                simpo_gamma: float = 0.0) -> torch.Tensor:
    """The preference term of each pair, [P] fp32 (without the NLL terms, see `step_loss`)."""
    c, r = policy.chosen.float(), policy.rejected.float()
    c_len, r_len = policy.chosen_tokens.clamp(min=1).float(), policy.rejected_tokens.clamp(min=1).float()
    if loss_type == "simpo":
        return -F.logsigmoid(beta * (c / c_len - r / r_len) - simpo_gamma)
    if loss_type == "orpo":
        c_mean, r_mean = c / c_len, r / r_len
        # log odds = log P - log(1 - P); log1p(-exp(x)) is finite for x < 0, which a mean log-prob always is.
        log_odds = (c_mean - torch.log1p(-torch.exp(c_mean))) - (r_mean - torch.log1p(-torch.exp(r_mean)))
        return -beta * F.logsigmoid(log_odds)
    if reference is None:
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
    chosen_ratio = c - reference.chosen.float()
    rejected_ratio = r - reference.rejected.float()
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss_type == "ipo":
        return (chosen_ratio / c_len - rejected_ratio / r_len - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def nll_weight(loss_type: str, rpo_alpha: float | None) -> float:
    """The weight of the chosen answers' token-mean NLL in the loss: ORPO's own term (1) plus rpo_alpha."""
    return (1.0 if loss_type == "orpo" else 0.0) + (rpo_alpha or 0.0)


def loss_sum(policy: PairLogProbs, reference: PairLogProbs | None, *, loss_type: str, beta: float, simpo_gamma: float = 0.0,
             rpo_alpha: float | None = None) -> torch.Tensor:
    """The summed loss of this pass's pairs: each pair's preference term plus `nll_weight` times the NLL of its
    chosen answer per token. The step's loss is the sum over its passes divided by its pair count."""
    losses = pair_losses(policy, reference, loss_type=loss_type, beta=beta, simpo_gamma=simpo_gamma)
    weight = nll_weight(loss_type, rpo_alpha)
    if weight:
        losses = losses + weight * -policy.chosen.float() / policy.chosen_tokens.clamp(min=1)
    return losses.sum()


@torch.no_grad()
def reward_sums(policy: PairLogProbs, reference: PairLogProbs | None, *, loss_type: str, beta: float) -> dict[str, float]:
    """Sums over the pairs (divide by the pair count for TRL's means) of TRL's rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies, logps/chosen and logps/rejected (named with '_' for '/'). The reward is beta times the log-ratio
    to the reference, or for the reference-free losses beta times the mean token log-prob (as TRL's CPOTrainer)."""
    c, r = policy.chosen.detach().float(), policy.rejected.detach().float()
    if needs_reference(loss_type):
        assert reference is not None
        chosen_reward = beta * (c - reference.chosen.float())
        rejected_reward = beta * (r - reference.rejected.float())
    else:
        chosen_reward = beta * c / policy.chosen_tokens.clamp(min=1)
        rejected_reward = beta * r / policy.rejected_tokens.clamp(min=1)
    return {
        "rewards_chosen": float(chosen_reward.sum()),
        "rewards_rejected": float(rejected_reward.sum()),
        "rewards_margins": float((chosen_reward - rejected_reward).sum()),
        "rewards_accuracies": float((chosen_reward > rejected_reward).float().sum()),
        "logps_chosen": float(c.sum()),
        "logps_rejected": float(r.sum()),
    }


def sequence_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                       amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's target tokens ([B] fp32, with autograd to the adapters when gradients are
    on) and the rows' target counts ([B] int64), for a padded batch (`input_ids`, `attention_mask`, `labels`
    with -100 outside the answers). The output head runs in chunks (`losses.linear_token_log_probs`): no
    full-vocabulary logits are held."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = batch.pop("labels")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Row t predicts label t+1; the last position of a row predicts nothing.
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        hidden = base.model(**batch, use_cache=False).last_hidden_state
        token_log_probs = linear_token_log_probs(hidden.reshape(-1, hidden.size(-1)), base.get_output_embeddings().weight,
                                                 targets.reshape(-1), ignore_index=IGNORE_INDEX)
    return token_log_probs.view(targets.shape).sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


# --- pairs: tokenize, truncate together, batch whole --------------------------------------------------------

@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as two token sequences with the same prompt tokens; labels mark each answer."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    truncated: bool
    index: int = 0  # the pair's place in its file: the key of its reference log-probs
    @property
    def n_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def tokenize_pair(tokenizer: Any, example: Example, *, max_seq_length: int) -> TokenizedPair:
    """Both answers rendered after the same prompt (the chat template, the answer and its end-of-turn tokens as
    targets), then truncated the same way when the longer sequence exceeds max_seq_length: first the prompt,
    from its start (the turns nearest the answer stay), down to what the longer answer leaves, but to no less
    than half of max_seq_length; then both answers from their end to the room the prompt leaves."""
    assert example.format == "preference" and example.messages is not None
    sides = [tokenize_example(tokenizer, Example(line=example.line, format="chat",
                                                 messages=[*example.messages, {"role": "assistant", "content": answer or ""}]),
                              max_seq_length=10**9)
             for answer in (example.preferred, example.non_preferred)]
    prompt_lengths = [_first_target(side) for side in sides]
    prompt = min(prompt_lengths)  # equal unless the template renders the answer's start into the prompt
    longest_answer = max(len(side.input_ids) - prompt for side in sides)
    if prompt + longest_answer <= max_seq_length:
        return TokenizedPair(sides[0], sides[1], truncated=False)
    keep_prompt = min(prompt, max(max_seq_length - longest_answer, max_seq_length // 2, 1))
    cut = prompt - keep_prompt
    end = max_seq_length + cut
    chosen, rejected = (TokenizedExample(input_ids=s.input_ids[cut:end], labels=[IGNORE_INDEX, *s.labels[cut + 1:end]], truncated=True)
                        for s in sides)
    return TokenizedPair(chosen, rejected, truncated=True)


def _first_target(example: TokenizedExample) -> int:
    return next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))


@dataclass(frozen=True)
class PairStats:
    """Token counts of a pair file after truncation; `n_dropped` pairs lost every answer token and are not trained."""

    n_pairs: int
    n_tokens: int
    max_tokens: int
    n_truncated: int
    n_dropped: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_pairs(tokenizer: Any, examples: list[Example], *, max_seq_length: int) -> tuple[list[TokenizedPair], PairStats]:
    """Tokenize every pair; pairs where either answer has no target token left are dropped (and counted)."""
    pairs, dropped = [], 0
    for example in examples:
        pair = tokenize_pair(tokenizer, example, max_seq_length=max_seq_length)
        if pair.chosen.n_target_tokens == 0 or pair.rejected.n_target_tokens == 0:
            dropped += 1
            continue
        pairs.append(pair)
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]
    return pairs, PairStats(n_pairs=len(pairs), n_tokens=sum(p.n_tokens for p in pairs), max_tokens=max(lengths, default=0),
                            n_truncated=sum(p.truncated for p in pairs), n_dropped=dropped)


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded micro-batch of whole pairs: rows [chosen_1..chosen_k, rejected_1..rejected_k] (TRL's order), so
    chosen and rejected of a pair always go through the same forward."""
    return collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)


def split_pairs(logps: torch.Tensor, tokens: torch.Tensor) -> PairLogProbs:
    """`sequence_log_probs` of a `collate_pairs` batch as pairs."""
    k = logps.shape[0] // 2
    return PairLogProbs(logps[:k], logps[k:], tokens[:k], tokens[k:])
