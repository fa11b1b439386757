"""Variable-length ("varlen") attention for packed rows: each example attends only to itself, and no
[tokens x tokens] mask is ever built.

A packed row holds several examples back to back, with position ids restarting at 0 for each. With
`attn_implementation="sdpa"` transformers turns the restarts into a dense block-diagonal mask, and SDPA
then runs its memory-efficient kernel over the whole row: the attention work of every masked-out block is
done anyway (a row of ten 400-token examples costs the attention of one 4,000-token sequence), k and v are
repeated to all query heads, and each layer keeps the mask as a bias. `"varlen"` instead hands the
segment boundaries (cumulative lengths, `cu_seq_lens`) to a variable-length kernel:

- on CUDA, torch's FlashAttention varlen kernel (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10),
  which reads k/v at their own (grouped-query) head count;
- elsewhere (the CPU, fp32, an older torch), one causal SDPA call per example: the same result, slower.

The trainer computes the boundaries once per micro-batch (`varlen_kwargs`) and passes them through the model
call; transformers forwards them to every attention layer. Registered with transformers under the name
"varlen" by `register()` (`use(name)` does it when needed); no attention mask is built for that name (transformers builds masks only for the
implementations it knows).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

NAME = "varlen"


def varlen_kwargs(position_ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Segment boundaries of a packed row [1, T] from its position ids (a segment starts where the position is 0),
    as the keyword arguments transformers passes down to the attention layers."""
    if position_ids.dim() != 2 or position_ids.size(0) != 1:
        raise ValueError("varlen attention needs one packed row: position_ids of shape [1, T]")
    flat = position_ids[0].cpu()
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("a packed row must start with position 0")
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _torch_varlen():
    """torch's varlen kernel and the keyword arguments for causal attention in this torch version, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                             position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls: query [1, heads, T, d], key/value [1, kv_heads, T, d];
    returns the output as [1, T, heads, d] (the layout transformers' attention functions return)."""
    if dropout:
        raise ValueError("varlen attention does not implement attention dropout")
    n_rep = query.size(1) // key.size(1)
    if cu_seq_lens_q is None and (query.size(0) > 1 or position_ids is None):
        # Rows that are not packed (padded batches): plain causal attention per row. Right padding (our
        # collator's) never changes what a real token sees under a causal mask, so no padding mask is needed.
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=n_rep > 1)
        return out.transpose(1, 2).contiguous(), None
    if cu_seq_lens_q is None:
        derived = varlen_kwargs(position_ids, query.device)
        cu_seq_lens_q, max_length_q = derived["cu_seq_lens_q"], derived["max_length_q"]
    q = query[0].transpose(0, 1)  # [T, heads, d]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    kernel = _torch_varlen() if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else None
    if kernel is not None:
        varlen_attn, causal, has_gqa = kernel
        extra = dict(causal, scale=scaling)
        if n_rep > 1:
            if has_gqa:
                extra["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **extra)
        return out.unsqueeze(0), None
    # Fallback: one causal SDPA call per example.
    bounds = cu_seq_lens_q.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        outs.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                                   is_causal=True, scale=scaling, enable_gqa=n_rep > 1))
    out = torch.cat(outs, dim=2)  # [1, heads, T, d]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make attn_implementation="varlen" known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


def use(name: str) -> str:
    """The attention implementation to hand transformers, registering ours first when it is "varlen"."""
    if name == NAME:
        register()
    return name
