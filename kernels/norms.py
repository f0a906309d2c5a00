"""RMSNorm with an optional fused residual add and Gemma's ``(offset + weight)`` scale.

``x``, ``residual``: [tokens, hidden]; ``weight``: [hidden].
"""
from __future__ import annotations

import torch


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
