"""The one transformer definition for Llama, Mistral, Gemma and Qwen2, run bidirectionally on packed tokens.

Parameters use the engine format's layout (fused q/k/v and gate/up projections), so a converted
checkpoint loads with no renaming. The arithmetic that differs between the reference path and the
fast path goes through :class:`engine.backends.Ops`; everything else (matrix products, embedding,
residual stream) is plain PyTorch and identical for both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.rotary import rotary_cos_sin, rotary_inv_freq

from .backends import REFERENCE, Ops
from .batch import PackedBatch
from .config import ModelConfig


class EncoderLayer(nn.Module):
    """Pre-norm block: bidirectional self-attention then gated MLP, both with residuals."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = nn.Parameter(torch.empty(cfg.hidden_size))
        # Rows [q | k | v]: [q_size + 2 * kv_size, hidden].
        self.qkv = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.mlp_norm = nn.Parameter(torch.empty(cfg.hidden_size))
        # Rows [gate | up]: [2 * intermediate, hidden].
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: PackedBatch,
        ops: Ops,
        dropout_p: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the previous block's output [tokens, hidden], not yet added to ``residual``.

        Returns ``(mlp_output, residual)``; the caller (or the next layer's norm) adds them. Deferring
        the add lets the backend fuse it into the following RMSNorm.
        """
        cfg = self.cfg
        n_tokens = x.shape[0]
        h, residual = ops.rms_norm(x, self.attn_norm, cfg.rms_norm_eps, cfg.norm_weight_offset, residual)
        qkv = self.qkv(h)
        q = qkv[:, : cfg.q_size].view(n_tokens, cfg.num_heads, cfg.head_dim)
        k = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(n_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(n_tokens, cfg.num_kv_heads, cfg.head_dim)
        q, k = ops.rotary(q, k, *rope)
        attn = ops.attention(q, k, v, batch, dropout_p)
        x = self.o(attn.reshape(n_tokens, cfg.q_size))
        h, residual = ops.rms_norm(x, self.mlp_norm, cfg.rms_norm_eps, cfg.norm_weight_offset, residual)
        return self.down(ops.gated_activation(self.gate_up(h), cfg.activation)), residual


class EncoderModel(nn.Module):
    """Bidirectional decoder-as-encoder. ``forward`` maps a :class:`PackedBatch` to final hidden
    states [tokens, hidden], after the final norm. ``lm_head`` exists only when the checkpoint keeps
    one (or ties it to the embeddings) and is used for MNTP training.
    """

    def __init__(self, cfg: ModelConfig, with_lm_head: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lm_head = (
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if with_lm_head and not cfg.tie_word_embeddings
            else None
        )
        # float32 [head_dim / 2]; a plain attribute, not a buffer, so that casting the weights to
        # bf16 never rounds the frequencies (see _apply).
        self.inv_freq = rotary_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.ops: Ops = REFERENCE
        self.gradient_checkpointing = False

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Recompute the rotary frequencies on the weights' device, in float32, after every .to().
        super()._apply(fn, recurse)
        cfg = self.cfg
        self.inv_freq = rotary_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(self.embed.weight.device)
        return self

    def forward(self, batch: PackedBatch, dropout_p: float = 0.0) -> torch.Tensor:
        """Final hidden states [tokens, hidden] (after the final norm) for every packed token."""
        x, residual = self.hidden_before_norm(batch, dropout_p)
        return self.ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps, self.cfg.norm_weight_offset, residual)[0]

    def hidden_before_norm(self, batch: PackedBatch, dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's output and the residual stream, not yet added nor normed, so that a
        backend can fuse the final add and norm into whatever reads them (pooling)."""
        cfg = self.cfg
        x = self.embed(batch.input_ids)
        if cfg.embedding_scale != 1.0:
            # Gemma scales by sqrt(hidden) rounded to the activation dtype, as transformers does.
            x = x * torch.tensor(cfg.embedding_scale, dtype=x.dtype)
        # Rotary angles depend only on positions: computed once per batch, shared by every layer.
        rope = rotary_cos_sin(batch.positions, self.inv_freq)
        residual = None
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, residual = torch.utils.checkpoint.checkpoint(
                    layer, x, residual, rope, batch, self.ops, dropout_p, use_reentrant=False
                )
            else:
                x, residual = layer(x, residual, rope, batch, self.ops, dropout_p)
        return x, residual

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits [tokens, vocab] from final hidden states (tied to the embeddings if configured)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if self.cfg.tie_word_embeddings:
            return F.linear(hidden, self.embed.weight)
        raise ValueError("this checkpoint was converted without an LM head; convert with --keep-lm-head")
