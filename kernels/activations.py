"""Gated activations over the fused gate/up projection.

``gate_up``: [tokens, 2 * intermediate] laid out as ``[gate | up]``; output [tokens, intermediate].
``activation``: ``"silu"`` (Llama, Mistral, Qwen2) or ``"gelu_tanh"`` (Gemma).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def gated_activation_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` in the input dtype, as transformers computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
