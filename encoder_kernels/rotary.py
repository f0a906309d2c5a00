"""Rotary position embedding on packed tokens, half-split ("rotate_half") convention, optionally
after an RMSNorm over each head (Qwen3's q/k norm).

``q``: [tokens, n_heads, head_dim]; ``k``: [tokens, n_kv_heads, head_dim]; ``cos``, ``sin``:
float32 [tokens, head_dim // 2], from each token's position inside its own sequence; ``q_weight``,
``k_weight``: [head_dim], the norms' scales.

``rotary_reference`` and ``qk_norm_rotary_reference`` are the plain-PyTorch paths (new tensors);
``rotary_`` and ``qk_norm_rotary_`` launch one Triton kernel (``QK_NORM`` a compile-time flag) that
works in place in one launch: one program per token normalises and rotates all of that token's q and
k heads, so views into a fused qkv projection output are updated without a copy, and the normed q/k
are never written out between the two steps.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from encoder_kernels._common import check_dtype, check_launchable, interpreting
from encoder_kernels.norms import rms_norm_reference


def rotary_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies, float32 [head_dim // 2], with Llama-3.1 (``llama3``) scaling if given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions``: int [tokens] -> float32 cos, sin [tokens, head_dim // 2]."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return freqs.cos(), freqs.sin()


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (new tensors, autograd-friendly); math in float32, cast back to the input dtype."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def qk_norm_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over each head of q and k (scaled by ``q_weight`` / ``k_weight`` [head_dim]; norm in
    float32, rounded to the input dtype as the model's RMSNorm is), then :func:`rotary_reference`."""
    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x.reshape(-1, x.shape[-1]), w, eps)[0].view(x.shape)

    return rotary_reference(norm(q, q_weight), norm(k, k_weight), cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------




@triton.jit
def _rotate_heads(base, n_heads, stride_h, half, c, s, offs, mask_half, W, eps,
                  BLOCK_HEADS: tl.constexpr, QK_NORM: tl.constexpr):
    """Rotate all heads of one token in place; ``c``, ``s``: fp32 [1, BLOCK_HALF]. With ``QK_NORM``
    each head is first RMS-normalised over its head_dim (both halves) and scaled by ``W`` [head_dim]."""
    heads = tl.arange(0, BLOCK_HEADS)
    mask = (heads < n_heads)[:, None] & mask_half[None, :]
    p1 = base + heads[:, None] * stride_h + offs[None, :]  # first half of each head
    p2 = p1 + half  # second half
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    if QK_NORM:
        # Masked lanes load 0, so the sums cover exactly the head's 2 * half elements.
        rstd = tl.rsqrt((tl.sum(x1f * x1f, 1) + tl.sum(x2f * x2f, 1)) / (2 * half) + eps)[:, None]
        w1 = tl.load(W + offs, mask=mask_half, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(W + half + offs, mask=mask_half, other=0.0).to(tl.float32)[None, :]
        x1f = x1f * rstd * w1
        x2f = x2f * rstd * w2
    tl.store(p1, (x1f * c - x2f * s).to(x1.dtype), mask=mask)
    tl.store(p2, (x2f * c + x1f * s).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QW, KW, eps, n_q_heads, n_kv_heads, half,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, QK_NORM: tl.constexpr,
):
    """One program per token: load its cos/sin row once, (normalise and) rotate its q heads, then its
    k heads. ``QW``/``KW`` are read only with ``QK_NORM``."""
    t = tl.program_id(0).to(tl.int64)  # token * fused-qkv row stride can overflow int32
    offs = tl.arange(0, BLOCK_HALF)
    mask_half = offs < half  # head dims such as 96 run in a power-of-two tile
    c = tl.load(COS + t * stride_ct + offs, mask=mask_half, other=0.0)[None, :]
    s = tl.load(SIN + t * stride_st + offs, mask=mask_half, other=0.0)[None, :]
    _rotate_heads(Q + t * stride_qt, n_q_heads, stride_qh, half, c, s, offs, mask_half, QW, eps, BLOCK_HQ, QK_NORM)
    _rotate_heads(K + t * stride_kt, n_kv_heads, stride_kh, half, c, s, offs, mask_half, KW, eps, BLOCK_HK, QK_NORM)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def rotary_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [T, H, D] and ``k`` [T, KV, D] IN PLACE (same math as ``rotary_reference``); returns
    ``(q, k)``, the same tensor objects.

    q and k: same float dtype (float32/float16/bfloat16), last dim contiguous; token and head strides
    are free, so views of a fused qkv buffer work. They must not overlap each other. ``cos``, ``sin``:
    float32 [T, D // 2], last dim contiguous (from ``rotary_cos_sin``). D must be even.
    """
    return _launch(q, k, cos, sin, None)


def qk_norm_rotary_(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS-normalise each head of ``q`` and ``k`` (scales ``q_weight``, ``k_weight``: float [D]), then
    rotate them, IN PLACE in one launch (the math of ``qk_norm_rotary_reference``, without its
    intermediate rounding of the normed values); returns ``(q, k)``. Layout rules as :func:`rotary_`."""
    head_dim = q.shape[-1] if q.dim() == 3 else -1
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (head_dim,) or not w.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [{head_dim}], got {w.dtype} {tuple(w.shape)}")
        if w.device != q.device:
            raise ValueError(f"{name} is on {w.device}, q on {q.device}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return _launch(q, k, cos, sin, (q_weight.contiguous(), k_weight.contiguous(), float(eps)))


def _launch(q, k, cos, sin, norm):
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        check_dtype(name, t)
        if t.numel() and t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if q.dtype != k.dtype:
        raise ValueError(f"q ({q.dtype}) and k ({k.dtype}) dtypes differ")
    n_tokens, head_dim = q.shape[0], q.shape[2]
    if k.shape[0] != n_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on tokens or head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (n_tokens, half) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [{n_tokens}, {half}], got {t.dtype} {tuple(t.shape)}")
        if t.numel() and t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    devices = {t.device for t in (q, k, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"q, k, cos, sin are on different devices: {sorted(map(str, devices))}")
    check_launchable(q.device)
    if n_tokens == 0 or half == 0:
        return q, k

    # Without the norm the weight pointers are never read; q stands in for them.
    q_weight, k_weight, eps = norm if norm is not None else (q, q, 1.0)
    block_hq = triton.next_power_of_2(q.shape[1])
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(n_tokens,)](
        q, k, cos, sin, q_weight, k_weight, eps, q.shape[1], k.shape[1], half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=block_half,
        QK_NORM=norm is not None,
        num_warps=1 if interpreting() else max(1, min(8, block_hq * block_half // 256)),
    )
    return q, k
