"""The one transformer definition for Llama, Mistral, Gemma, Gemma-2, Qwen2 and Qwen3, on packed tokens.

Bidirectional (LLM2Vec, gte-Qwen2) or causal (e5-mistral, Qwen3-Embedding) attention, and every family
difference, come from :class:`ModelConfig` fields; nothing here looks at the family name.

Parameters use the engine format's layout (fused q/k/v and gate/up projections), so a converted
checkpoint loads with no renaming. The arithmetic that differs between the reference path and the
fast path goes through :class:`engine.backends.Ops`; everything else (matrix products, embedding,
residual stream) is plain PyTorch and identical for both.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from encoder_kernels.rotary import rotary_cos_sin, rotary_inv_freq

from .backends import REFERENCE, Ops
from .batch import PackedBatch
from .config import ModelConfig
from .format import (ENGINE_CONFIG, WEIGHTS_INDEX, EngineConfig, FormatError, load_state_dict, model_config_hash,
                     read_index, verify_shards)


class EncoderLayer(nn.Module):
    """Pre-norm block: self-attention then gated MLP, both with residuals.

    Optional per family: q/k RMSNorm over each head before rotary (``qk_norm``, Qwen3); an RMSNorm on
    the attention output and one on the MLP output before their residual adds (``post_norms``,
    Gemma-2); a sliding window (``ModelConfig.layer_window``).
    """

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = cfg.layer_window(index)
        self.attn_norm = nn.Parameter(torch.empty(cfg.hidden_size))
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.empty(cfg.head_dim))
            self.k_norm = nn.Parameter(torch.empty(cfg.head_dim))
        if cfg.post_norms:
            self.post_attn_norm = nn.Parameter(torch.empty(cfg.hidden_size))
            self.post_mlp_norm = nn.Parameter(torch.empty(cfg.hidden_size))
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
        if cfg.qk_norm:
            q, k = ops.qk_norm_rotary(q, k, self.q_norm, self.k_norm, cfg.rms_norm_eps, *rope)
        else:
            q, k = ops.rotary(q, k, *rope)
        attn = ops.attention(q, k, v, batch, dropout_p, causal=cfg.causal, softcap=cfg.attn_logit_softcap,
                             window=self.window, scale=cfg.attention_scale)
        x = self.o(attn.reshape(n_tokens, cfg.q_size))
        if cfg.post_norms:
            x = ops.rms_norm(x, self.post_attn_norm, cfg.rms_norm_eps, cfg.norm_weight_offset)[0]
        h, residual = ops.rms_norm(x, self.mlp_norm, cfg.rms_norm_eps, cfg.norm_weight_offset, residual)
        if ops.gated_mlp is not None:  # the backend runs the whole MLP (the CPU's: in token blocks)
            x = ops.gated_mlp(h, self.gate_up, self.down, cfg.activation)
        else:
            x = self.down(ops.gated_activation(self.gate_up(h), cfg.activation))
        if cfg.post_norms:
            x = ops.rms_norm(x, self.post_mlp_norm, cfg.rms_norm_eps, cfg.norm_weight_offset)[0]
        return x, residual


class EncoderModel(nn.Module):
    """Decoder-as-encoder. ``forward`` maps a :class:`PackedBatch` to final hidden
    states [tokens, hidden], after the final norm. ``lm_head`` exists only when the checkpoint keeps
    one (or ties it to the embeddings) and is used for MNTP training.
    """

    def __init__(self, cfg: ModelConfig, with_lm_head: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(cfg.num_layers))
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
            logits = self.lm_head(hidden)
        elif self.cfg.tie_word_embeddings:
            logits = F.linear(hidden, self.embed.weight)
        else:
            raise ValueError("this checkpoint was converted without an LM head; convert with --keep-lm-head")
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    @classmethod
    def from_engine_dir(
        cls, path: str | Path, device: torch.device, dtype: torch.dtype | None, verify: bool = False,
        config: EngineConfig | None = None,
    ) -> "EncoderModel":
        """The model of an engine directory, weights read straight onto ``device`` in ``dtype``
        (None: as stored). Everything is checked before a tensor is read: the layer count and tensor
        names against the index, each shard's recorded model-config hash, and with ``verify`` every
        shard's sha256; shapes and dtypes as each tensor is read. Raises :class:`FormatError`."""
        path = Path(path)
        config = EngineConfig.read(path) if config is None else config
        index = read_index(path)
        layers = {name.split(".")[1] for name in index.weight_map if name.startswith("layers.")}
        if layers != {str(i) for i in range(config.model.num_layers)}:
            raise FormatError(f"{path / WEIGHTS_INDEX}: holds {len(layers)} layers but {ENGINE_CONFIG} says "
                              f"num_layers={config.model.num_layers}")
        if verify:
            verify_shards(path, index)
        # Built on the meta device (no allocation); the stored tensors are adopted as parameters.
        with torch.device("meta"):
            model = cls(config.model, with_lm_head=config.has_lm_head)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        state = load_state_dict(path, expected, model_config_hash(config.model), device, dtype, index)
        model.load_state_dict(state, assign=True)
        # The weights are cast already; .to() also recomputes the rotary frequencies off the meta device.
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
        return model
