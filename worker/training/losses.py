"""Chunked, fused output head + cross-entropy: the loss without the full [tokens x vocab] logits.

The plain path (`logits = lm_head(hidden)`, `.float()`, `cross_entropy`) holds about 12 bytes per logit at
the start of backward (see contract/memory.py): for a 128k vocabulary and 4,096 tokens that is 6 GiB, often more than
the LoRA activations of the whole model. Here the rows go through the head `chunk_tokens` at a time, and
while a chunk's logits are alive the forward also computes its gradient (softmax - onehot) and reduces it
at once to the gradient of `hidden` (and of the head's weight when it is trained). Backward then only
scales those buffers by the incoming gradient. The peak of the loss falls to `logits_peak_bytes` (one
chunk's logits) at the cost of computing the gradients even when backward is never called, which is why
the gradient work is skipped when no gradient is needed (evaluation, `torch.no_grad`).

Per chunk the head matmul runs in the weight's dtype (bf16 like the plain path under autocast), its result
is upcast to fp32 and everything after that happens in place in that fp32 buffer: max, exp, softmax,
minus onehot. Losses, counts and the head's gradient accumulate in fp32 / int64 on the device, so the
loop never synchronises with the GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from contract.memory import fused_loss_chunk_bytes
from worker.training.tunables import LOSS_CHUNK_TOKENS


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                         ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H] (already aligned with labels: row i predicts labels[i]), weight [V, H] (the output head, frozen or not),
    labels [N] int64. Returns (loss_sum fp32 scalar with autograd to hidden (and to weight if weight.requires_grad),
    n_targets int64 scalar tensor, n_correct int64 scalar tensor: argmax == label over target rows).

    Equal to `F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=ignore_index, reduction="sum")`
    with `hidden` cast to `weight.dtype` first. The matmuls run with autocast disabled, in `weight.dtype`, so
    it can be called inside the model's autocast region. The gradient of `hidden` comes back in `hidden.dtype`,
    that of `weight` in `weight.dtype` (accumulated in fp32). The computed gradients can be used by one
    backward only: a second backward through the same result (retain_graph) raises."""
    _check_shapes(hidden, weight, labels, chunk_tokens)
    grad_enabled = torch.is_grad_enabled()
    need_hidden_grad = grad_enabled and hidden.requires_grad
    need_weight_grad = grad_enabled and weight.requires_grad
    with torch.autocast(hidden.device.type, enabled=False):
        if not (need_hidden_grad or need_weight_grad):
            with torch.no_grad():
                return _chunked_loss(hidden, weight, labels, chunk_tokens, ignore_index, None, None)
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, ignore_index, need_hidden_grad, need_weight_grad)


def _check_shapes(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def logits_peak_bytes(chunk_tokens: int, vocab_size: int) -> int:
    """Extra memory the loss holds at its peak beyond its inputs and the grad_hidden buffer, for the memory estimate.

    Per logit of one chunk: 4 bytes for the fp32 logits (which become the softmax and then the gradient in
    place) plus 2 for a half-precision copy alive next to them twice per chunk: the head's bf16/fp16 output
    while it is upcast, and the gradient cast back to bf16/fp16 for the matmul with the head. With an fp32
    head both copies are the fp32 buffer itself and the peak is 4 bytes per logit; this returns the larger
    value. Not counted: [chunk, H] and [chunk] temporaries (a few percent when H << V), and, only when the
    head itself is trained, its fp32 gradient accumulator (V * H * 4 bytes) and the cast of it in backward.
    The figure lives in contract/memory.py (torch-free), where the API's estimate uses it too."""
    return fused_loss_chunk_bytes(chunk_tokens, vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int, ignore_index: int,
                need_hidden_grad: bool, need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        loss_sum, n_targets, n_correct = _chunked_loss(hidden, weight, labels, chunk_tokens, ignore_index, grad_hidden, grad_weight)
        ctx.mark_non_differentiable(n_targets, n_correct)
        # Saved (not kept as ctx attributes) so that autograd frees them after backward, and so that a second
        # backward fails on the version check instead of reading the buffers that the first one scaled in place.
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum, n_targets, n_correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: a scaled copy would hold a second [N, H] (or [V, H]) buffer.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int, ignore_index: int,
                  grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None,
                  row_losses: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss sum and counts; fills grad_hidden (rows) and adds into grad_weight when they are given, and writes each
    row's -log p (0 for ignored rows) into row_losses when it is given."""
    targets = labels != ignore_index
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    n_correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        grad_rows = grad_hidden[rows] if grad_hidden is not None else None
        chunk_rows, chunk_correct = _chunk(hidden[rows], weight, labels[rows], targets[rows], grad_rows, grad_weight)
        loss_sum += chunk_rows.sum()
        n_correct += chunk_correct
        if row_losses is not None:
            row_losses[rows] = chunk_rows
    return loss_sum, targets.sum(), n_correct


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
           grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk, in its own function so that its [chunk, V] buffer is freed on return: a loop variable would
    keep it alive while the next chunk's logits are made, doubling the peak. Returns each row's loss (0 where
    ignored) and the count of rows whose argmax is the label."""
    hidden_cast = hidden.to(weight.dtype)  # the head's matmuls run in its dtype
    # Ignored rows get class 0 so that gather and scatter stay in range; their results are masked out.
    label = torch.where(valid, labels, 0).unsqueeze(1)

    logits = (hidden_cast @ weight.t()).float()  # the head's own-dtype output is freed once upcast
    target_logit = logits.gather(1, label).squeeze(1)
    row_max, predicted = logits.max(dim=1)
    probs = logits.sub_(row_max.unsqueeze(1)).exp_()  # in place: the fp32 buffer is the only [chunk, V] one
    sum_exp = probs.sum(dim=1)
    row_loss = row_max + sum_exp.log() - target_logit  # logsumexp - logit[label]
    rows = torch.where(valid, row_loss, 0.0)
    correct = (valid & (predicted == label.squeeze(1))).sum()

    if grad_hidden is not None or grad_weight is not None:
        grad_logits = probs.div_(sum_exp.unsqueeze(1))  # softmax
        grad_logits.scatter_add_(1, label, torch.full_like(target_logit, -1.0).unsqueeze(1))  # minus onehot
        grad_logits.masked_fill_(~valid.unsqueeze(1), 0.0)
        if grad_hidden is not None:
            grad_hidden.copy_(grad_logits.to(weight.dtype) @ weight)
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), hidden_cast.float())
    return rows, correct


# --- per-token log-probs for preference objectives -------------------------------------------------------

def linear_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           chunk_tokens: int = LOSS_CHUNK_TOKENS, ignore_index: int = -100) -> torch.Tensor:
    """Each row's log p(label) under the head, fp32 of shape [N] (0 where the label is ignored), through the same
    chunks as `linear_cross_entropy`: no [N x vocab] logits. A preference loss sums these per sequence.

    The head must be frozen (`weight.requires_grad` False while gradients are on): a per-row gradient of the head
    would need one [V, H] buffer per distinct incoming gradient. Backward scales the gradient rows of `hidden`,
    computed in the forward, by the incoming per-row gradient; like `linear_cross_entropy` the result can be used
    by one backward only."""
    _check_shapes(hidden, weight, labels, chunk_tokens)
    grad_enabled = torch.is_grad_enabled()
    if grad_enabled and weight.requires_grad:
        raise ValueError("per-sequence log-probs need a frozen output head; this head is trained")
    with torch.autocast(hidden.device.type, enabled=False):
        if not (grad_enabled and hidden.requires_grad):
            with torch.no_grad():
                row_losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
                _chunked_loss(hidden, weight, labels, chunk_tokens, ignore_index, None, None, row_losses)
                return row_losses.neg_()
        return _LinearTokenLogProbs.apply(hidden, weight, labels, chunk_tokens, ignore_index)


class _LinearTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                ignore_index: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        row_losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        _chunked_loss(hidden, weight, labels, chunk_tokens, ignore_index, grad_hidden, None, row_losses)
        ctx.save_for_backward(grad_hidden)
        return row_losses.neg_()

    @staticmethod
    def backward(ctx: Any, grad_log_probs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        # d log p / d hidden = -(softmax - onehot) @ W: the saved rows, scaled in place by -g per row.
        grad_hidden = grad_hidden.mul_(grad_log_probs.neg().unsqueeze(1))
        return grad_hidden, None, None, None, None
