"""Non-causal variable-length attention over packed sequences.

``q``: [total_tokens, n_heads, head_dim]; ``k``, ``v``: [total_tokens, n_kv_heads, head_dim];
``cu_seqlens``: int32 [batch + 1] prefix sums of the sequence lengths. Every token attends to every
token of its own sequence and to none of the others.

``varlen_attention_reference`` is the plain-PyTorch path; ``varlen_attention`` is a one-pass
FlashAttention-2 style Triton kernel (online softmax, no [L, L] matrix in memory). Grid: (query blocks
of ``max_seqlen``, batch * n_heads); query blocks past a sequence's end return at once.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import check_dtype, check_launchable, interpreting


def rows_by_length(seqlens: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The packed token rows of the sequences grouped by length: one int64 [seqs, length] tensor per
    distinct non-zero length, on ``device`` (the reference attention runs one call per group)."""
    starts_by_length: dict[int, list[int]] = {}
    start = 0
    for length in seqlens:
        if length:
            starts_by_length.setdefault(length, []).append(start)
        start += length
    return [
        (torch.tensor(starts)[:, None] + torch.arange(length)).to(device)
        for length, starts in starts_by_length.items()
    ]


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    groups: list[torch.Tensor] | None = None,
    *,
    causal: bool = False,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Plain-PyTorch attention over packed sequences (supports autograd and dropout).

    Sequences of equal length are gathered into one batched call, so nothing is padded: the result
    is what attending to each sequence on its own gives. ``groups``: ``rows_by_length`` of the batch,
    if the caller has it (the model computes it once per batch, not once per layer); otherwise it is
    derived from ``cu_seqlens``. ``causal``: query i sees keys j <= i of its sequence. ``softcap``:
    scores become ``softcap * tanh(score / softcap)`` before the softmax (Gemma-2). ``window``:
    ``(left, right)``, query i sees only keys in ``[i - left, i + right]``. Returns a tensor of q's
    shape and dtype. ``max_seqlen`` is accepted for signature parity with the kernel and unused.
    Dropout applies to the attention probabilities, as in training.
    """
    del max_seqlen
    total, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    scale = head_dim ** -0.5 if scale is None else scale
    if groups is None:
        groups = rows_by_length(cu_seqlens.diff().tolist(), q.device)
    if not groups:
        return q.new_empty(q.shape)
    outs = []
    for index in groups:  # [seqs, length]
        # [seqs, length, heads, head_dim] -> [seqs, heads, length, head_dim]
        qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))
        if softcap is None and window is None:
            o = F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout_p, scale=scale, is_causal=causal, enable_gqa=n_heads != n_kv
            )
        else:
            o = _explicit_attention(qs, ks, vs, scale, dropout_p, causal, softcap, window)
        outs.append(o.transpose(1, 2).reshape(-1, n_heads, head_dim))
    rows = torch.cat([index.flatten() for index in groups])
    return q.new_zeros(q.shape).index_copy(0, rows, torch.cat(outs))


def attention_mask(length: int, causal: bool, window: tuple[int, int] | None, device: torch.device | str) -> torch.Tensor | None:
    """bool [length, length], True where query i may see key j (None: every key visible)."""
    if not causal and window is None:
        return None
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    keep = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        left, right = window
        keep &= (j >= i - left) & (j <= i + right)
    return keep


def _explicit_attention(qs, ks, vs, scale, dropout_p, causal, softcap, window):
    """Scores materialised, for what SDPA cannot express (soft-capping, windows): [seqs, heads, L, D].
    Math in float32, the probabilities cast to the input dtype before the product with v, as
    transformers' eager attention does."""
    n_heads, n_kv, length = qs.shape[1], ks.shape[1], qs.shape[2]
    if n_heads != n_kv:
        ks = ks.repeat_interleave(n_heads // n_kv, dim=1)
        vs = vs.repeat_interleave(n_heads // n_kv, dim=1)
    s = (qs.float() @ ks.float().transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    keep = attention_mask(length, causal, window, qs.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))  # the diagonal is always kept: no all-masked row
    p = torch.softmax(s, dim=-1)
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return (p.to(vs.dtype) @ vs)


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------

_MAX_HEAD_DIM = 256



def _configs() -> list[triton.Config]:
    """Autotuning space, fixed at import, as triton fixes interpreter mode when it is imported."""
    if interpreting():
        # The interpreter runs every program in numpy: one small tile (16 is tl.dot's minimum) and
        # no tuning, since benchmarking configs there only costs time.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (128, 128, 8, 3),
            (128, 64, 8, 3),
            (128, 64, 4, 3),
            (128, 32, 4, 3),
            (64, 64, 4, 3),
            (64, 64, 4, 2),
            (64, 64, 8, 2),
            (64, 32, 4, 2),
            (32, 32, 4, 2),
        )
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """float32 operands take the FMA (IEEE) path, where every larger tile spills registers heavily
    (ptxas, sm_90): keep the smallest. Tiles that overflow shared memory need no pruning here: the
    autotuner skips configs that fail with OutOfResources."""
    if named_args["Q"].dtype == torch.float32:
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32] or configs[-1:]
    return configs


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, k_base, v_base, n0, seqlen, qk_scale, stride_kt, stride_vt,
    offs_n, offs_d, mask_d,
    MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys/values ``[n0, n0 + BLOCK_N)`` of one sequence into the running softmax state.

    ``acc``: fp32 [BLOCK_M, BLOCK_D] unnormalised output; ``m_i``, ``l_i``: fp32 [BLOCK_M] running
    row max (log2 domain) and row sum. Only the last block of a sequence needs the key mask.
    """
    cols = n0 + offs_n
    # K is loaded transposed, [BLOCK_D, BLOCK_N], so that q @ k needs no in-register transpose.
    k_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
    if MASK_N:
        mask_n = cols < seqlen
        k = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    # Every block holds at least one real key, so m_new is finite and exp2(-inf - m_new) = 0.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK_N:
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.autotune(configs=_configs(), key=["BLOCK_D", "GROUP", "SEQ_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _varlen_attention_kernel(
    Q, K, V, O, cu_seqlens, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    SEQ_BUCKET,  # next power of two of max_seqlen: only an autotuning key (long and short batches differ)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M queries of one head of one sequence against all of that sequence's keys."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    # int64 token offsets: tokens * (fused qkv row stride) overflows int32 on long packed batches.
    start = tl.load(cu_seqlens + seq).to(tl.int64)
    seqlen = (tl.load(cu_seqlens + seq + 1) - start).to(tl.int32)
    if pid_m * BLOCK_M >= seqlen:
        return  # grid covers max_seqlen; this sequence is shorter

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < HEAD_DIM  # head dims such as 96 run in a power-of-two tile
    kv_head = head // GROUP

    q_ptrs = Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, n0, seqlen, qk_scale,
                                      stride_kt, stride_vt, offs_n, offs_d, mask_d, False, DOT_PRECISION)
    if n_full < seqlen:
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, n_full, seqlen, qk_scale,
                                      stride_kt, stride_vt, offs_n, offs_d, mask_d, True, DOT_PRECISION)

    # Padded query rows saw real keys only, so l_i > 0 everywhere; they are masked at the store.
    acc = acc / l_i[:, None]
    o_ptrs = O + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    out: torch.Tensor | None,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        check_dtype(name, t)
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has {q.shape[0]} tokens but k/v have {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} differs from k/v head_dim {k.shape[2]}")
    n_heads, n_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} unsupported; the kernel handles 1..{_MAX_HEAD_DIM}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [batch + 1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() - 1 > 65535:
        raise ValueError(f"batch of {cu_seqlens.numel() - 1} sequences exceeds the grid limit of 65535")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    devices = {t.device for t in (q, k, v, cu_seqlens)} | ({out.device} if out is not None else set())
    if len(devices) != 1:
        raise ValueError(f"q, k, v, cu_seqlens{', out' if out is not None else ''} are on different devices: "
                         f"{sorted(map(str, devices))}")
    check_launchable(q.device)
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
        if out.numel() and out.stride(-1) != 1:
            raise ValueError("out must be contiguous in its last (head_dim) dimension")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    causal: bool = False,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence; returns a tensor of q's shape and dtype.

    ``q``: [T, H, D]; ``k``, ``v``: [T, KV, D] with ``H % KV == 0`` (grouped-query: query head h reads
    kv head ``h // (H // KV)``); D in 1..256; float32, float16 or bfloat16 (softmax and accumulation
    in float32). Only the last dimension must be contiguous: q/k/v may be views of a fused qkv
    projection, whose token stride is (H + 2 * KV) * D. ``cu_seqlens``: int32 [batch + 1] on the same
    device; ``max_seqlen`` must be at least the longest sequence (not checked, to avoid a device sync:
    rows past it would be left unwritten). ``scale`` defaults to ``D ** -0.5``. ``out``: optional
    [T, H, D] buffer of q's dtype (last dim contiguous) to write into; it is returned.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, out)
    if causal or softcap is not None or window is not None:
        raise NotImplementedError("causal, softcap and window are not yet in the Triton kernel; use backend='reference'")
    total, n_heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total == 0 or batch == 0 or max_seqlen == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else float(scale)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_heads, batch)

    _varlen_attention_kernel[grid](
        q, k, v, out, cu_seqlens, scale * math.log2(math.e),  # exp2 is cheaper than exp
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        max(64, triton.next_power_of_2(max_seqlen)),  # >= 64: one integer specialisation
        GROUP=n_heads // k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot needs K >= 16
        # float32 inputs get true float32 products (tf32 would cost ~1e-3 relative error).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
