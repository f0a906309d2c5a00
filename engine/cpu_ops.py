"""The CPU backend's ops: the reference arithmetic, rearranged for a CPU's caches and allocator.

On a CPU the model's matrix products run near the BLAS peak; what costs the rest is memory traffic,
not arithmetic. Each eager op of the reference writes a fresh tensor, and a fresh tensor beyond
glibc's mmap threshold (128 KB, adapting up to 32 MB) is page-faulted in again at every call; the
float32 round trips of [tokens, hidden] tensors miss every cache; the reference attention gathers q,
k and v into copies and scatters the output back. These ops compute what the reference computes (the
same operations in the same dtypes and order, hence the same values) but

- in place, in buffers the model no longer needs: the residual add goes into the residual stream,
  the normed rows into the block output they came from, rotary into the fused qkv projection, the
  gated activation into the gate half of the gate/up projection, the attention output into q's slot;
- in blocks of rows of about ``BLOCK_ELEMENTS`` elements, so that float32 temporaries stay small and
  the allocator hands the same blocks back every time;
- the MLP in blocks of tokens, so that the [tokens, 2 * intermediate] gate/up projection never
  exists whole;
- attention over runs of consecutive sequences of one length as strided views of the packed q, k
  and v (one ``scaled_dot_product_attention`` call per run; ``encode`` batches are sorted by length,
  so a batch is a few runs): no gather, no scatter.

Inference only: the ops consume their inputs (see each one), so a tensor that requires grad is refused.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from encoder_kernels import attention as attention_kernels
from encoder_kernels.pooling import segment_pool_reference

from .batch import PackedBatch

# Rows per block: about 1M elements, so that a block's float32 temporaries (4 MB each) are handed back
# by the heap, far below glibc's largest mmap threshold (32 MB), while the ops stay few: every op is
# a parallel region, and where the cores are shared each region waits for every thread.
BLOCK_ELEMENTS = 1 << 20
# Rows per MLP block: about 4M gate/up outputs (8 MB in bf16), a few hundred tokens: large enough for
# the matrix products to run at full speed, small enough to stay below that threshold.
MLP_BLOCK_ELEMENTS = 1 << 22


def _blocks(n_rows: int, row_elements: int, block_elements: int | None = None) -> Iterator[slice]:
    block_elements = BLOCK_ELEMENTS if block_elements is None else block_elements
    step = max(1, block_elements // max(1, row_elements))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _inference_only(*tensors: torch.Tensor) -> None:
    if any(t.requires_grad for t in tensors):
        raise ValueError("the cpu backend is for inference (its ops work in place); training needs backend='reference'")


def _norm_rows_(h: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``out[i] = rms_norm(h[i]) * scale`` block by block, in ``rms_norm_reference``'s float32 arithmetic
    (one rounding to out's dtype). ``out`` may be ``h`` itself. h, out: [rows, ..., width]."""
    width = h.shape[-1]
    for rows in _blocks(h.shape[0], h[0].numel() if h.shape[0] else width):
        hf = h[rows].float()
        out[rows].copy_(hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * scale)
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm_reference``'s ``(norm(x + residual) * (offset + weight), x + residual)``, the same values.

    With ``residual`` both inputs are consumed: the sum is written into ``residual`` and the normed
    rows into ``x``, and those two tensors are returned. Without, ``x`` is left alone (it is the
    returned sum) and the normed rows are a new tensor. x, residual: [tokens, hidden]."""
    _inference_only(x, weight, *(() if residual is None else (residual,)))
    scale = offset + weight.float()
    if residual is None:
        return _norm_rows_(x, torch.empty_like(x), scale, eps), x
    h = residual.add_(x)  # x + residual in the activation dtype, as the reference's add
    return _norm_rows_(h, x, scale, eps), h


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_reference``'s rotation IN PLACE (views of the fused qkv projection are rotated where they
    lie): float32 math, one rounding. q: [T, H, D], k: [T, KV, D], cos/sin float32 [T, D / 2]."""
    _inference_only(q, k)
    for x in (q, k):
        half = x.shape[-1] // 2
        for rows in _blocks(x.shape[0], x[0].numel() if x.shape[0] else 1):
            x1, x2 = x[rows, :, :half], x[rows, :, half:]
            f1, f2 = x1.float(), x2.float()  # float32 inputs: the views themselves, so write last
            c, s = cos[rows, None, :], sin[rows, None, :]
            first = (f1 * c).sub_(f2 * s)
            second = (f2 * c).add_(f1 * s)
            x1.copy_(first)
            x2.copy_(second)
    return q, k


def qk_norm_rotary(q, k, q_weight, k_weight, eps, cos, sin):
    """RMSNorm over each head of q and k (in place), then rotary (in place): the reference's values."""
    _inference_only(q, k)
    _norm_rows_(q, q, q_weight.float(), eps)
    _norm_rows_(k, k, k_weight.float(), eps)
    return rotary_(q, k, cos, sin)


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` computed into the gate half of ``gate_up`` [T, 2I], which is consumed; returns
    that half, a [T, I] view with row stride 2I (matrix products read it as it lies)."""
    _inference_only(gate_up)
    if activation not in ("silu", "gelu_tanh"):
        raise ValueError(f"unknown activation {activation!r}; expected one of ('silu', 'gelu_tanh')")
    n = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :n], gate_up[:, n:]
    # No temporaries, so no blocks: two passes, whose first leaves the gate in cache only if small.
    if activation == "silu":
        F.silu(gate, inplace=True)
    else:
        torch.ops.aten.gelu_(gate, approximate="tanh")
    return gate.mul_(up)


def gated_mlp(h: torch.Tensor, gate_up: torch.nn.Linear, down: torch.nn.Linear, activation: str) -> torch.Tensor:
    """``down(act(gate) * up)`` over blocks of ``MLP_BLOCK_ELEMENTS`` gate/up outputs, written into one
    [tokens, hidden] output: the [tokens, 2 * intermediate] projection, the largest activation of the
    model, never exists whole (a block is reused from the heap instead of being faulted in at every
    layer). h: [tokens, hidden]. Layers that are not plain ``nn.Linear`` (LoRA-wrapped ones, say) run
    composed, as the model would run them."""
    _inference_only(h)
    if not (isinstance(gate_up, torch.nn.Linear) and isinstance(down, torch.nn.Linear)):
        return down(gated_activation(gate_up(h), activation))
    out = torch.empty((h.shape[0], down.out_features), dtype=h.dtype, device=h.device)
    for rows in _blocks(h.shape[0], gate_up.out_features, MLP_BLOCK_ELEMENTS):
        act = gated_activation(F.linear(h[rows], gate_up.weight, gate_up.bias), activation)
        if down.bias is None:
            torch.mm(act, down.weight.t(), out=out[rows])
        else:
            torch.addmm(down.bias, act, down.weight.t(), out=out[rows])
    return out


def equal_length_runs(seqlens: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive non-empty sequences of one length: ``(first token, length, count)``."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for length in seqlens:
        if length:
            if runs and runs[-1][1] == length and runs[-1][0] + runs[-1][1] * runs[-1][2] == start:
                runs[-1] = (runs[-1][0], length, runs[-1][2] + 1)
            else:
                runs.append((start, length, 1))
        start += length
    return runs


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, dropout_p: float = 0.0, *,
    causal: bool = False, softcap: float | None = None, window: tuple[int, int] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence, written into q's storage (q is consumed) and returned as
    [T, H, D] (a view of it). One SDPA call per run of equal-length sequences, on strided views.
    Soft-capping and windows go to the reference (their scores are materialised there anyway)."""
    if dropout_p:
        raise ValueError("the cpu backend is for inference; attention dropout needs backend='reference'")
    _inference_only(q, k, v)
    if softcap is not None or window is not None:
        return attention_kernels.varlen_attention_reference(
            q, k, v, batch.cu_seqlens, batch.max_seqlen, scale, 0.0, batch.rows_by_length,
            causal=causal, softcap=softcap, window=window)
    n_heads, n_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    for start, length, count in equal_length_runs(batch.seqlens):
        span = slice(start, start + length * count)
        # [count * length, heads, D] -> [count, heads, length, D], strided views of the packed rows
        qs, ks, vs = (t[span].unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, is_causal=causal, enable_gqa=n_heads != n_kv)
        qs.copy_(o)  # q's rows of this run are read by no other run
    return q


def norm_pool(x, residual, weight, eps, offset, plan, normalize):
    """The final residual add and RMSNorm (into ``x``, consumed with ``residual``), then the reference
    pooling of the normed rows: float32 [batch, hidden]."""
    if residual is None:
        normed = rms_norm(x, weight, eps, offset)[0]
    else:
        normed = rms_norm(x, weight, eps, offset, residual)[0]
    return segment_pool_reference(normed, plan.starts, plan.ends, plan.mode, normalize, plan.weights)


def pool(hidden, plan, normalize):
    return segment_pool_reference(hidden, plan.starts, plan.ends, plan.mode, normalize, plan.weights)

