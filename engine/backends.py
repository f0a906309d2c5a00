"""Backends: the handful of operations the model delegates, so that one model definition runs as the
plain-PyTorch reference (ground truth, autograd, dropout), on our fused Triton kernels, and on the
CPU's in-place ops (``engine/cpu_ops.py``: the reference's values, inference only).

Every op works on packed tokens:
- ``rms_norm(x, weight, eps, offset, residual) -> (normed, x + residual)``, x: [tokens, hidden]
- ``rotary(q, k, cos, sin) -> (q, k)``, q: [tokens, heads, head_dim], cos/sin: [tokens, head_dim / 2]
  (the Triton backend rotates in place)
- ``qk_norm_rotary(q, k, q_weight, k_weight, eps, cos, sin) -> (q, k)``: RMSNorm over each head of q
  and k (weights [head_dim], Qwen3), then rotary (the Triton backend fuses both, in place)
- ``attention(q, k, v, batch, dropout_p, *, causal, softcap, window, scale) -> [tokens, heads, head_dim]``
- ``gated_activation(gate_up, activation) -> [tokens, intermediate]``
- ``pool(hidden, plan, normalize) -> float32 [batch, hidden]``, ``plan``: an ``inputs.PoolingPlan``
  (spans validated on the host, optional per-token weights)
- ``norm_pool(x, residual, weight, eps, offset, plan, normalize) -> float32 [batch, hidden]``:
  the final residual add, RMSNorm and pooling in one, reading only the pooled rows
- ``gated_mlp(h, gate_up, down, activation) -> [tokens, hidden]`` (optional): the whole MLP,
  ``down(gated_activation(gate_up(h)))`` with the layer's two ``nn.Linear``; None: the model composes
  it from its products and ``gated_activation``
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from encoder_kernels import activations, attention, norms, pooling, rotary
from encoder_kernels._common import interpreting

from . import cpu_ops
from .batch import PackedBatch
from .choices import BACKENDS



@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    qk_norm_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    attention: Callable[..., torch.Tensor]
    gated_activation: Callable[..., torch.Tensor]
    pool: Callable[..., torch.Tensor]
    norm_pool: Callable[..., torch.Tensor]
    gated_mlp: Callable[..., torch.Tensor] | None = None


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, dropout_p: float = 0.0, *,
    causal: bool = False, softcap: float | None = None, window: tuple[int, int] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    return attention.varlen_attention_reference(
        q, k, v, batch.cu_seqlens, batch.max_seqlen, scale, dropout_p, batch.rows_by_length,
        causal=causal, softcap=softcap, window=window,
    )


def _reference_pool(hidden, plan, normalize):
    return pooling.segment_pool_reference(hidden, plan.starts, plan.ends, plan.mode, normalize, plan.weights)


def _reference_norm_pool(x, residual, weight, eps, offset, plan, normalize):
    return pooling.rms_norm_segment_pool_reference(x, weight, eps, plan.starts, plan.ends, plan.mode, normalize, offset,
                                                   residual, plan.weights)


def _triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, dropout_p: float = 0.0, *,
    causal: bool = False, softcap: float | None = None, window: tuple[int, int] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    if dropout_p:
        raise ValueError("the triton backend is for inference; attention dropout needs backend='reference'")
    return attention.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, scale,
                                      causal=causal, softcap=softcap, window=window,
                                      plan=batch.attention_plan(q.shape[1] // k.shape[1]))


def _triton_pool(hidden, plan, normalize):
    return pooling.segment_pool(hidden, plan.starts, plan.ends, plan.mode, normalize, weights=plan.weights, check=False)


def _triton_norm_pool(x, residual, weight, eps, offset, plan, normalize):
    return pooling.rms_norm_segment_pool(x, weight, eps, plan.starts, plan.ends, plan.mode, normalize, offset=offset,
                                         residual=residual, weights=plan.weights, check=False)


REFERENCE = Ops(
    name="reference",
    rms_norm=norms.rms_norm_reference,
    rotary=rotary.rotary_reference,
    qk_norm_rotary=rotary.qk_norm_rotary_reference,
    attention=_reference_attention,
    gated_activation=activations.gated_activation_reference,
    pool=_reference_pool,
    norm_pool=_reference_norm_pool,
)

TRITON = Ops(
    name="triton",
    rms_norm=norms.rms_norm,
    rotary=rotary.rotary_,
    qk_norm_rotary=rotary.qk_norm_rotary_,
    attention=_triton_attention,
    gated_activation=activations.gated_activation,
    pool=_triton_pool,
    norm_pool=_triton_norm_pool,
)


# The reference arithmetic rearranged for CPUs (in place, in cache-sized blocks, attention on views):
# the same values as REFERENCE, for inference; see engine/cpu_ops.py.
CPU = Ops(
    name="cpu",
    rms_norm=cpu_ops.rms_norm,
    rotary=cpu_ops.rotary_,
    qk_norm_rotary=cpu_ops.qk_norm_rotary,
    attention=cpu_ops.attention,
    gated_activation=cpu_ops.gated_activation,
    pool=cpu_ops.pool,
    norm_pool=cpu_ops.norm_pool,
    gated_mlp=cpu_ops.gated_mlp,
)


def default_backend(device: torch.device) -> str:
    """``triton`` on CUDA, ``cpu`` on the CPU, ``reference`` elsewhere."""
    return {"cuda": "triton", "cpu": "cpu"}.get(device.type, "reference")


def get_ops(name: str, device: torch.device) -> Ops:
    """The ops of backend ``name`` for tensors on ``device``; a clear error where they cannot run."""
    if name == "reference":
        return REFERENCE
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on the CPU, not on {device}")
        return CPU
    if name == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' on {device} needs a CUDA device, or TRITON_INTERPRET=1 set before "
                "triton is imported (the slow CPU interpreter, for tests)"
            )
        return TRITON
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
