"""Non-causal variable-length attention over packed sequences.

``q``: [total_tokens, n_heads, head_dim]; ``k``, ``v``: [total_tokens, n_kv_heads, head_dim];
``cu_seqlens``: int32 [batch + 1] prefix sums of the sequence lengths. Every token attends to every
token of its own sequence and to none of the others.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Plain-PyTorch attention, one sequence at a time (supports autograd and dropout).

    Returns a tensor of q's shape and dtype. ``max_seqlen`` is accepted for signature parity with the
    kernel and unused. Dropout applies to the attention probabilities, as in training.
    """
    del max_seqlen
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [1, heads, len, head_dim] per sequence; kv heads repeated for grouped-query attention.
        qs = q[start:end].transpose(0, 1).unsqueeze(0)
        ks = k[start:end].transpose(0, 1).repeat_interleave(n_heads // n_kv, dim=0).unsqueeze(0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(n_heads // n_kv, dim=0).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p, scale=scale)
        outs.append(o.squeeze(0).transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, dim=0)
