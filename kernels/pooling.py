"""Pooling of packed hidden states over one contiguous span of rows per sequence.

``hidden``: [total_tokens, hidden]; ``starts``, ``ends``: int [batch]; the pooled rows of sequence b
are ``hidden[starts[b]:ends[b]]``. Modes: ``mean``, ``weighted_mean`` (weights 1..n over the n rows),
``first``, ``last``. Accumulates in float32 and returns float32 [batch, hidden].
"""
from __future__ import annotations

import torch

POOLING_MODES = ("mean", "weighted_mean", "first", "last")


def check_spans(starts: torch.Tensor, ends: torch.Tensor, total_tokens: int, mode: str) -> None:
    """Raise ValueError for an unknown mode, an empty span or a span outside ``[0, total_tokens)``."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
    if starts.shape != ends.shape or starts.dim() != 1:
        raise ValueError(f"starts {tuple(starts.shape)} and ends {tuple(ends.shape)} must be equal 1-D shapes")
    if starts.numel() == 0:
        return
    empty = (ends <= starts).nonzero()
    if empty.numel():
        b = int(empty[0, 0])
        raise ValueError(f"empty pooling span for sequence {b}: [{int(starts[b])}, {int(ends[b])})")
    if int(starts.min()) < 0 or int(ends.max()) > total_tokens:
        raise ValueError(f"pooling spans exceed the {total_tokens} packed tokens")


def segment_pool_reference(
    hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, mode: str = "mean", normalize: bool = False
) -> torch.Tensor:
    """Plain-PyTorch segment pooling (autograd-friendly): float32 [batch, hidden]."""
    check_spans(starts, ends, hidden.shape[0], mode)
    rows = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        span = hidden[s:e].float()
        if mode == "mean":
            rows.append(span.mean(0))
        elif mode == "weighted_mean":
            w = torch.arange(1, e - s + 1, device=hidden.device, dtype=torch.float32)
            rows.append((span * w[:, None]).sum(0) / w.sum())
        elif mode == "first":
            rows.append(span[0])
        else:
            rows.append(span[-1])
    out = torch.stack(rows) if rows else hidden.new_zeros((0, hidden.shape[1]), dtype=torch.float32)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out
