"""Backends: the handful of operations the model delegates, so that one model definition runs both
as the plain-PyTorch reference (ground truth, autograd, dropout) and on fused kernels.

Every op works on packed tokens:
- ``rms_norm(x, weight, eps, offset, residual) -> (normed, x + residual)``, x: [tokens, hidden]
- ``rotary(q, k, cos, sin) -> (q, k)``, q: [tokens, heads, head_dim], cos/sin: [tokens, head_dim / 2]
- ``attention(q, k, v, batch, dropout_p) -> [tokens, heads, head_dim]``
- ``gated_activation(gate_up, activation) -> [tokens, intermediate]``
- ``pool(hidden, starts, ends, mode, normalize) -> float32 [batch, hidden]``
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.activations import gated_activation_reference
from kernels.attention import varlen_attention_reference
from kernels.norms import rms_norm_reference
from kernels.pooling import segment_pool_reference
from kernels.rotary import rotary_reference

from .batch import PackedBatch

BACKENDS = ("reference",)


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    attention: Callable[..., torch.Tensor]
    gated_activation: Callable[..., torch.Tensor]
    pool: Callable[..., torch.Tensor]


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, dropout_p: float = 0.0
) -> torch.Tensor:
    return varlen_attention_reference(q, k, v, batch.cu_seqlens.cpu(), batch.max_seqlen, dropout_p=dropout_p)


REFERENCE = Ops(
    name="reference",
    rms_norm=rms_norm_reference,
    rotary=rotary_reference,
    attention=_reference_attention,
    gated_activation=gated_activation_reference,
    pool=segment_pool_reference,
)


def get_ops(name: str) -> Ops:
    """The ops of backend ``name``."""
    if name == "reference":
        return REFERENCE
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
