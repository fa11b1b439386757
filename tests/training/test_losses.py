"""The chunked linear + cross-entropy against the plain path (full logits, `F.cross_entropy`) on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from worker.training.losses import linear_cross_entropy, logits_peak_bytes

IGNORE = -100


def make_inputs(n: int = 37, hidden_size: int = 16, vocab: int = 50, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random hidden/weight, labels with ~1/4 ignored and ~1/3 of the targets equal to the argmax, so that
    n_correct is neither 0 nor n_targets and a wrong count shows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    argmax = (hidden.to(dtype) @ weight.to(dtype).T).float().argmax(-1)
    pick = torch.rand(n, generator=g) < 0.33
    labels = torch.where(pick, argmax, labels)
    labels[torch.rand(n, generator=g) < 0.25] = IGNORE
    return hidden.to(dtype), weight.to(dtype), labels


def plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    logits = (hidden @ weight.T).float()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    mask = labels != IGNORE
    return loss, int(mask.sum()), int((logits.argmax(-1)[mask] == labels[mask]).sum())


CHUNKS = [8, 1, 64]  # 37 rows: not a multiple, one row per chunk, one chunk larger than N


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_loss_and_counts_match_plain_path(chunk, dtype, rtol):
    hidden, weight, labels = make_inputs(dtype=dtype)
    loss, n_targets, n_correct = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    ref_loss, ref_targets, ref_correct = plain(hidden, weight, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n_targets.dtype == n_correct.dtype == torch.int64
    assert 0 < ref_correct < ref_targets < len(labels)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    assert int(n_targets) == ref_targets
    assert int(n_correct) == ref_correct


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("weight_grad", [False, True])
def test_gradients_match_plain_path_fp32(chunk, weight_grad):
    hidden, weight, labels = make_inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
    linear_cross_entropy(h1, w1, labels, chunk_tokens=chunk)[0].backward()
    plain(h2, w2, labels)[0].backward()
    assert h1.grad.dtype == torch.float32
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    if weight_grad:
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    else:
        assert w1.grad is None


def test_gradients_match_plain_path_bf16():
    hidden, weight, labels = make_inputs(dtype=torch.bfloat16)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_cross_entropy(h1, w1, labels, chunk_tokens=8)[0].backward()
    plain(h2, w2, labels)[0].backward()
    assert h1.grad.dtype == w1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), rtol=2e-2, atol=2e-3)


def test_only_weight_requires_grad():
    hidden, weight, labels = make_inputs()
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w1, labels, chunk_tokens=8)[0].backward()
    plain(hidden, w2, labels)[0].backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_backward_scales_by_incoming_gradient():
    hidden, weight, labels = make_inputs()
    grads = []
    for scale in (1.0, -3.0):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, n_targets, _ = linear_cross_entropy(h, w, labels, chunk_tokens=8)
        (loss * scale / n_targets).backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[1][0], -3.0 * grads[0][0])
    torch.testing.assert_close(grads[1][1], -3.0 * grads[0][1])


def test_second_backward_raises_instead_of_reusing_scaled_buffers():
    hidden, weight, labels = make_inputs()
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, labels, chunk_tokens=8)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_no_grad_returns_same_loss_without_graph():
    hidden, weight, labels = make_inputs()
    h = hidden.clone().requires_grad_()
    with_grad = linear_cross_entropy(h, weight, labels, chunk_tokens=8)
    with torch.no_grad():
        without = linear_cross_entropy(h, weight, labels, chunk_tokens=8)
    assert with_grad[0].grad_fn is not None
    assert without[0].grad_fn is None and not without[0].requires_grad
    for a, b in zip(with_grad, without, strict=True):
        torch.testing.assert_close(a.detach(), b)
    # Inputs that need no gradient give no graph either, with grad mode on.
    assert linear_cross_entropy(hidden, weight, labels)[0].grad_fn is None


@pytest.mark.parametrize("n", [0, 37])
def test_all_ignored_gives_zero_loss_counts_and_grad(n):
    hidden, weight, _ = make_inputs(n=n)
    labels = torch.full((n,), IGNORE, dtype=torch.long)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, n_targets, n_correct = linear_cross_entropy(h, w, labels, chunk_tokens=8)
    assert float(loss.detach()) == 0.0 and int(n_targets) == 0 and int(n_correct) == 0
    loss.backward()
    assert h.grad.shape == h.shape and not h.grad.any()
    assert w.grad.shape == w.shape and not w.grad.any()


def test_inside_bf16_autocast_with_fp32_hidden_and_bf16_head():
    hidden, weight, labels = make_inputs()
    weight = weight.to(torch.bfloat16)
    scale = torch.full((hidden.shape[1],), 1.5)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed1 = h1 * scale  # an upstream op that autocast leaves in fp32, as RMSNorm's upcast
        assert normed1.dtype == torch.float32
        loss, _, _ = linear_cross_entropy(normed1, weight, labels, chunk_tokens=8)
        normed2 = h2 * scale
        ref = F.cross_entropy((normed2 @ weight.T).float(), labels, ignore_index=IGNORE, reduction="sum")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)
    # The head matmul runs in bf16 like the plain path's, not in fp32: much nearer to the bf16 result.
    fp32 = F.cross_entropy((hidden * scale) @ weight.float().T, labels, ignore_index=IGNORE, reduction="sum")
    assert abs(float(loss.detach() - ref.detach())) < abs(float(fp32 - ref.detach())) / 10
    loss.backward()
    ref.backward()
    assert h1.grad.dtype == torch.float32
    torch.testing.assert_close(h1.grad, h2.grad, rtol=2e-2, atol=2e-3)


class LiveBytes(TorchDispatchMode):
    """Counts, after each op, the bytes of the live tensor storages that ops allocated under this mode (sampled
    right after an op allocates its output, which is where a peak can occur). Holds only weak references, so
    a tensor freed by the code under test leaves the count. The CPU's answer to max_memory_allocated."""

    def __init__(self):
        super().__init__()
        self.storages: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an argument's storage: only storages that no argument holds are new.
        seen = {StorageWeakRef(a.untyped_storage()) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (ref := StorageWeakRef(t.untyped_storage())) not in seen:
                self.storages.setdefault(ref, t.untyped_storage().nbytes())
        self.storages = {ref: n for ref, n in self.storages.items() if not ref.expired()}
        self.peak = max(self.peak, sum(self.storages.values()))
        return out


@pytest.mark.parametrize("dtype, grad", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)])
def test_logits_peak_bytes_matches_what_the_loss_allocates(dtype, grad):
    n, hidden_size, vocab, chunk = 100, 8, 4096, 32
    hidden, weight, labels = make_inputs(n=n, hidden_size=hidden_size, vocab=vocab, dtype=dtype)
    hidden.requires_grad_(grad)
    with LiveBytes() as counter:
        linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    grad_hidden_bytes = hidden.nbytes if grad else 0
    extra = counter.peak - grad_hidden_bytes
    per_logit = 6 if dtype == torch.bfloat16 else 4  # an fp32 head makes no half-precision copies
    expected = logits_peak_bytes(chunk, vocab) * per_logit // 6
    assert expected <= extra <= expected * 1.03  # the rest: [chunk, H] and [chunk] temporaries
