"""Gated activations over the fused gate/up projection.

``gate_up``: [tokens, 2 * intermediate] laid out as ``[gate | up]``; output [tokens, intermediate].
``activation``: ``"silu"`` (Llama, Mistral, Qwen2) or ``"gelu_tanh"`` (Gemma).

``gated_activation_reference`` is the plain-PyTorch path; ``gated_activation`` the Triton kernel
(float32 math, one rounding to the input dtype; the activation is a compile-time constant).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from encoder_kernels._common import check_dtype, check_launchable

ACTIVATIONS = ("silu", "gelu_tanh")


def gated_activation_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` in the input dtype, as transformers computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------




@triton.jit
def _gated_activation_kernel(
    GU, OUT, n_cols, stride_gt, stride_ot, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr
):
    """Program (t, j): columns ``[j * BLOCK, (j + 1) * BLOCK)`` of token t's output row."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    row = GU + t * stride_gt
    gate = tl.load(row + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    u = tl.load(row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "silu":
        a = g * tl.sigmoid(g)
    else:
        # gelu_tanh(g) = 0.5 g (1 + tanh(z)), z = sqrt(2/pi) (g + 0.044715 g^3); 0.5 (1 + tanh(z))
        # equals sigmoid(2 z), which Triton has on every backend (tanh is not in triton.language).
        a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    tl.store(OUT + t * stride_ot + cols, (a * u).to(gate.dtype), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def gated_activation(
    gate_up: torch.Tensor, activation: str, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(gate) * up`` for ``gate_up`` [T, 2I] = ``[gate | up]``: returns [T, I] in gate_up's dtype.

    float32/float16/bfloat16; last dim contiguous (row stride free). ``activation``: ``"silu"`` or
    ``"gelu_tanh"``. ``out``: optional [T, I] buffer of the same dtype (last dim contiguous); returned.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [tokens, 2 * intermediate], got shape {tuple(gate_up.shape)}")
    check_dtype("gate_up", gate_up)
    if gate_up.numel() and gate_up.stride(1) != 1:
        raise ValueError("gate_up must be contiguous in its last dimension")
    n_tokens, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty((n_tokens, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != (n_tokens, n_cols) or out.dtype != gate_up.dtype or (out.numel() and out.stride(1) != 1):
        raise ValueError(f"out must be {gate_up.dtype} [{n_tokens}, {n_cols}] contiguous in its last "
                         f"dimension, got {out.dtype} {tuple(out.shape)}")
    if out.device != gate_up.device:
        raise ValueError(f"out is on {out.device}, gate_up on {gate_up.device}")
    check_launchable(gate_up.device)
    if out.numel() == 0:
        return out

    block = min(1024, triton.next_power_of_2(n_cols))
    _gated_activation_kernel[(n_tokens, triton.cdiv(n_cols, block))](
        gate_up, out, n_cols, gate_up.stride(0), out.stride(0),
        ACTIVATION=activation, BLOCK=block, num_warps=4,
    )
    return out
