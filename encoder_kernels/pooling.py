"""Pooling of packed hidden states over one contiguous span of rows per sequence.

``hidden``: [total_tokens, hidden]; ``starts``, ``ends``: int [batch]; the pooled rows of sequence b
are ``hidden[starts[b]:ends[b]]``. Modes: ``mean``, ``weighted_mean`` (weights 1..n over the n rows),
``first``, ``last``. Optional ``weights``: float32 [total_tokens]; ``mean`` then computes
``sum(w x) / sum(w)`` over the span (a token of weight 0 is skipped: a special token inside a text).
Accumulates in float32 and returns float32 [batch, hidden].

``segment_pool_reference`` is the plain-PyTorch path. The Triton launchers: ``segment_pool`` (same
semantics) and ``rms_norm_segment_pool``, which applies the model's final RMSNorm (and the pending
residual add) to the pooled rows only, inside the pooling kernel, so the normed [total_tokens, hidden]
tensor is never written. One program per sequence holds a whole hidden row, so the L2 normalisation
happens in the same kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from encoder_kernels._common import check_launchable, check_rows, interpreting
from encoder_kernels.norms import rms_norm_reference

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
    hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, mode: str = "mean", normalize: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch segment pooling (autograd-friendly): float32 [batch, hidden]."""
    check_spans(starts, ends, hidden.shape[0], mode)
    check_weights(weights, hidden.shape[0], mode)
    rows = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        span = hidden[s:e].float()
        if mode == "mean" and weights is not None:
            w = weights[s:e].float()
            rows.append((span * w[:, None]).sum(0) / w.sum())
        elif mode == "mean":
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


def rms_norm_segment_pool_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    starts: torch.Tensor,
    ends: torch.Tensor,
    mode: str = "mean",
    normalize: bool = False,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``segment_pool_reference(rms_norm_reference(hidden, weight, eps, offset, residual)[0], ...)``."""
    normed = rms_norm_reference(hidden, weight, eps, offset, residual)[0]
    return segment_pool_reference(normed, starts, ends, mode, normalize, weights)


def check_weights(weights: torch.Tensor | None, total_tokens: int, mode: str) -> None:
    if weights is None:
        return
    if mode != "mean":
        raise ValueError(f"per-token weights apply to mode 'mean' (sum(w x) / sum(w)), not {mode!r}")
    if weights.shape != (total_tokens,) or weights.dtype != torch.float32:
        raise ValueError(f"weights must be float32 [{total_tokens}], got {weights.dtype} {tuple(weights.shape)}")


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------

_MODE_IDS = {mode: i for i, mode in enumerate(POOLING_MODES)}  # the kernel's MODE constexpr



@triton.jit
def _segment_pool_kernel(
    X, R, W, WT, OUT, starts, ends, eps, n_cols, stride_xt, stride_rt, stride_ob,
    MODE: tl.constexpr,  # index into POOLING_MODES
    NORMALIZE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    OFFSET: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program pools sequence ``program_id(0)``: BLOCK_T rows of BLOCK_H (>= hidden) columns a step.

    With HAS_NORM each row is first RMS-normalised, ``x * rsqrt(mean(x^2) + eps) * (OFFSET + w)``,
    after adding ``R`` when HAS_RESIDUAL, exactly as the unfused final norm would produce it.
    """
    seq = tl.program_id(0)
    start = tl.load(starts + seq).to(tl.int64)
    end = tl.load(ends + seq).to(tl.int64)
    if MODE == 2:  # first
        end = start + 1
    if MODE == 3:  # last
        start = end - 1
    n = (end - start).to(tl.int32)

    cols = tl.arange(0, BLOCK_H)
    mask_h = cols < n_cols
    if HAS_NORM:
        w = tl.load(W + cols, mask=mask_h, other=0.0).to(tl.float32) + OFFSET
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    wsum = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, n, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows < n)[:, None] & mask_h[None, :]
        x = tl.load(X + (start + rows)[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + (start + rows)[:, None] * stride_rt + cols[None, :], mask=mask, other=0.0)
            # The residual stream is summed in the activation dtype, as the model's add is.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        x = x.to(tl.float32)
        if HAS_NORM:
            rstd = tl.rsqrt(tl.sum(x * x, 1) / n_cols + eps)
            # Rounded to the activation dtype, as the unfused norm's output is before pooling reads it.
            x = (x * rstd[:, None] * w[None, :]).to(X.dtype.element_ty).to(tl.float32)
        if MODE == 1:  # weighted_mean: row i of the span (0-based) has weight i + 1
            x = x * (rows + 1).to(tl.float32)[:, None]
        if HAS_WEIGHTS:
            wt = tl.load(WT + start + rows, mask=rows < n, other=0.0)
            x = x * wt[:, None]
            wsum += wt
        acc += x  # masked rows and columns are exactly 0
    pooled = tl.sum(acc, 0)
    nf = n.to(tl.float32)
    if MODE == 0:
        if HAS_WEIGHTS:
            pooled = pooled / tl.sum(wsum, 0)
        else:
            pooled = pooled / nf
    if MODE == 1:
        pooled = pooled / (nf * (nf + 1.0) * 0.5)
    if NORMALIZE:
        # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        pooled = pooled / tl.maximum(tl.sqrt(tl.sum(pooled * pooled, 0)), 1e-12)
    tl.store(OUT + seq * stride_ob + cols, pooled, mask=mask_h)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _launch_settings(block_h: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps): about 16K elements in flight per step on a GPU."""
    if interpreting():
        return 16, 4
    block_t = max(1, min(64, 16384 // block_h))
    num_warps = 32 if block_h >= 32768 else 16 if block_t * block_h >= 16384 else 8
    return block_t, num_warps


def _pool(
    hidden: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    mode: str,
    normalize: bool,
    out: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    eps: float = 0.0,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    total, n_cols = check_rows("hidden", hidden)
    for name, t in (("starts", starts), ("ends", ends)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if check:
        check_spans(starts, ends, total, mode)
    elif mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
    check_weights(weights, total, mode)
    tensors = {"hidden": hidden, "starts": starts, "ends": ends, "weight": weight, "residual": residual, "out": out,
               "weights": weights}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) != 1:
        raise ValueError(f"tensors on different devices: {', '.join(f'{k}={v}' for k, v in devices.items())}")
    check_launchable(hidden.device)
    if weight is not None and weight.shape != (n_cols,):
        raise ValueError(f"norm weight must be [{n_cols}], got {tuple(weight.shape)}")
    if residual is not None:
        if residual.shape != hidden.shape or residual.dtype != hidden.dtype:
            raise ValueError(f"residual must match hidden: {tuple(hidden.shape)} {hidden.dtype}, "
                             f"got {tuple(residual.shape)} {residual.dtype}")
        if residual.stride(1) != 1:
            raise ValueError("residual must be contiguous in its last dimension")
    batch = starts.numel()
    if out is None:
        out = torch.empty((batch, n_cols), dtype=torch.float32, device=hidden.device)
    elif out.shape != (batch, n_cols) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be float32 [{batch}, {n_cols}] contiguous in its last dimension, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if batch == 0:
        return out

    block_h = triton.next_power_of_2(n_cols)
    block_t, num_warps = _launch_settings(block_h)
    _segment_pool_kernel[(batch,)](
        hidden, residual if residual is not None else hidden, weight if weight is not None else hidden,
        weights if weights is not None else out, out, starts.contiguous(), ends.contiguous(), float(eps), n_cols,
        hidden.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        MODE=_MODE_IDS[mode], NORMALIZE=bool(normalize), HAS_NORM=weight is not None,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHTS=weights is not None, OFFSET=float(offset),
        BLOCK_T=block_t, BLOCK_H=block_h, num_warps=num_warps,
    )
    return out


def segment_pool(
    hidden: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    mode: str = "mean",
    normalize: bool = False,
    *,
    weights: torch.Tensor | None = None,
    check: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool ``hidden[starts[b]:ends[b]]`` for every b: float32 [batch, hidden], L2-normalised if asked.

    ``hidden``: [T, hidden] float32/float16/bfloat16, last dim contiguous (row stride free).
    ``starts``, ``ends``: int32/int64 [batch] on hidden's device. An unknown mode, an empty span or a
    span outside [0, T) raises ValueError before launch (this check reads the spans: one device sync;
    ``check=False`` skips it for spans the caller validated on the host). ``weights``: optional
    float32 [T] per-token weights for ``mean``. ``out``: optional float32 [batch, hidden] buffer to
    write into; it is returned.
    """
    return _pool(hidden, starts, ends, mode, normalize, out, weights=weights, check=check)


def rms_norm_segment_pool(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    starts: torch.Tensor,
    ends: torch.Tensor,
    mode: str = "mean",
    normalize: bool = False,
    *,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    check: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``segment_pool(rms_norm(hidden, weight, eps, offset, residual)[0], starts, ends, mode, normalize)``
    in one kernel that reads only the pooled rows and never writes the normed hidden states.

    ``weight``: [hidden] (any float dtype); ``residual``: optional [T, hidden] of hidden's dtype, last
    dim contiguous, added to ``hidden`` first (the model's pending residual add). Other arguments as
    in :func:`segment_pool`. Returns float32 [batch, hidden].
    """
    return _pool(hidden, starts, ends, mode, normalize, out, weight, eps, offset, residual, weights, check)
