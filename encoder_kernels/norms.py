"""RMSNorm with an optional fused residual add and Gemma's ``(offset + weight)`` scale.

``x``, ``residual``: [tokens, hidden]; ``weight``: [hidden].

``rms_norm_reference`` is the plain-PyTorch path; ``rms_norm`` the Triton kernel: one pass reads
``x`` (and ``residual``), writes the normed rows and, with a residual, the sum ``x + residual``.
The offset is a compile-time constant (0 for Llama/Mistral/Qwen2, 1 for Gemma).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from encoder_kernels._common import check_launchable, check_rows, interpreting


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(norm(x + residual) * (offset + weight), x + residual)``.

    The sum is taken in x's dtype (as the model's residual stream is); the normalisation in float32,
    cast to x's dtype once at the end. Without ``residual`` the second output is ``x`` itself.
    """
    h = x if residual is None else x + residual
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.float())
    return y.to(x.dtype), h


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------




@triton.jit
def _rms_norm_kernel(
    X, R, W, Y, H, eps, n_rows, n_cols, stride_xt, stride_rt, stride_yt, stride_ht,
    HAS_RESIDUAL: tl.constexpr, OFFSET: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program normalises BLOCK_T rows of BLOCK_H (>= hidden) columns."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_H)
    mask_h = cols < n_cols
    mask = (rows < n_rows)[:, None] & mask_h[None, :]
    x = tl.load(X + rows[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_rt + cols[None, :], mask=mask, other=0.0)
        # The residual stream is summed in the activation dtype (one rounding), as the model's add is.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_ht + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 1) / n_cols + eps)
    w = tl.load(W + cols, mask=mask_h, other=0.0).to(tl.float32) + OFFSET
    y = xf * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_yt + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _launch_settings(block_h: int) -> tuple[int, int]:
    """(BLOCK_T rows per program, num_warps): small hidden sizes get several rows per program."""
    if interpreting():
        return 16, 4
    block_t = max(1, min(16, 2048 // block_h))
    num_warps = 32 if block_h >= 32768 else 16 if block_h >= 8192 else 8 if block_h >= 2048 else 4
    return block_t, num_warps


def _check_2d(name: str, t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
    if t.shape != shape or t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(norm(x + residual) * (offset + weight), x + residual)``, as ``rms_norm_reference``.

    ``x``: [T, hidden] float32/float16/bfloat16, last dim contiguous (row stride free); ``residual``:
    optional, same shape and dtype; ``weight``: [hidden], any float dtype. Without ``residual`` the
    second output is ``x`` itself. ``out`` / ``residual_out``: optional [T, hidden] buffers of x's
    dtype for the two outputs; they must not overlap the inputs.
    """
    n_rows, n_cols = check_rows("x", x)
    if weight.shape != (n_cols,) or not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor [{n_cols}], got {weight.dtype} {tuple(weight.shape)}")
    if residual is not None:
        _check_2d("residual", residual, x.shape, x.dtype)
    tensors = {"x": x, "weight": weight, "residual": residual, "out": out, "residual_out": residual_out}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) != 1:
        raise ValueError(f"tensors on different devices: {', '.join(f'{k}={v}' for k, v in devices.items())}")
    check_launchable(x.device)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        _check_2d("out", out, x.shape, x.dtype)
    if residual is None:
        if residual_out is not None:
            raise ValueError("residual_out is only written when a residual is given")
        summed = x
    elif residual_out is None:
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        _check_2d("residual_out", residual_out, x.shape, x.dtype)
        summed = residual_out
    if n_rows == 0:
        return out, summed

    block_h = triton.next_power_of_2(n_cols)
    block_t, num_warps = _launch_settings(block_h)
    _rms_norm_kernel[(triton.cdiv(n_rows, block_t),)](
        x, residual if residual is not None else x, weight, out, summed, float(eps), n_rows, n_cols,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), summed.stride(0),
        HAS_RESIDUAL=residual is not None, OFFSET=float(offset),
        BLOCK_T=block_t, BLOCK_H=block_h, num_warps=num_warps,
    )
    return out, summed
