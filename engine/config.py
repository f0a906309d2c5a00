"""Model configuration: one dataclass with explicit per-family fields.

Family differences (norm offset, embedding scale, activation, q/k/v bias, rope scaling) are plain
fields read from a Hugging Face ``config.json``; nothing downstream looks at the family name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Hugging Face architectures we convert, by ``model_type``. Gemma2/3, Phi, etc. differ in more than
# these fields (soft-capping, sandwich norms, ...) and are refused rather than silently mis-run.
SUPPORTED_FAMILIES = ("llama", "mistral", "gemma", "qwen2")
_ARCHITECTURE_FAMILY = {
    f"{prefix}{suffix}": family
    for family, prefix in (("llama", "Llama"), ("mistral", "Mistral"), ("gemma", "Gemma"), ("qwen2", "Qwen2"))
    for suffix in ("ForCausalLM", "Model")
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


class ConfigError(ValueError):
    """A config.json that this engine cannot run, with the reason."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and per-family behaviour of a bidirectional decoder encoder.

    ``norm_weight_offset`` is 1.0 for Gemma's ``(1 + weight)`` RMSNorm; ``embedding_scale`` multiplies
    token embeddings (``sqrt(hidden_size)`` for Gemma); ``activation`` is the MLP gate (``silu`` or
    ``gelu_tanh``); ``qkv_bias`` is Qwen2's q/k/v bias; ``rope_scaling`` is None or a ``llama3`` dict.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=True)
    activation: str = "silu"
    norm_weight_offset: float = 0.0
    embedding_scale: float = 1.0
    qkv_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"unsupported activation {self.activation!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "llama3":
            raise ConfigError(f"unsupported rope scaling {self.rope_scaling.get('rope_type')!r}; supported: llama3")

    # Sizes of the fused projections the engine format stores.
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout)."""
        family = _family_of(hf)
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            head_dim = hf.get("head_dim") or hidden // heads
            rope = hf.get("rope_parameters") or {}
            rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
            scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            if scaling is not None:
                rope_type = scaling.get("rope_type", scaling.get("type"))
                if rope_type in (None, "default"):
                    scaling = None
                elif rope_type != "llama3":
                    raise ConfigError(f"unsupported rope scaling type {rope_type!r} (supported: llama3)")
                else:
                    scaling = {
                        "rope_type": "llama3",
                        "factor": float(scaling["factor"]),
                        "low_freq_factor": float(scaling["low_freq_factor"]),
                        "high_freq_factor": float(scaling["high_freq_factor"]),
                        "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
                    }
            is_gemma = family == "gemma"
            act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
            if is_gemma and act_name == "gelu":
                # Gemma's released configs say "gelu" but the model was trained with the tanh approximation.
                act_name = "gelu_pytorch_tanh"
            if act_name not in _ACTIVATIONS:
                raise ConfigError(f"unsupported hidden activation {act_name!r}")
            return cls(
                family=family,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                activation=_ACTIVATIONS[act_name],
                norm_weight_offset=1.0 if is_gemma else 0.0,
                embedding_scale=math.sqrt(hidden) if is_gemma else 1.0,
                qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
            )
        except KeyError as exc:
            raise ConfigError(f"config.json is missing the field {exc.args[0]!r}") from None


def _family_of(hf: dict[str, Any]) -> str:
    architectures = hf.get("architectures") or []
    for arch in architectures:
        if arch in _ARCHITECTURE_FAMILY:
            return _ARCHITECTURE_FAMILY[arch]
    if architectures:
        raise ConfigError(
            f"unsupported architecture {architectures[0]!r}; supported: Llama, Mistral, Gemma, Qwen2 "
            "(*ForCausalLM or *Model)"
        )
    model_type = hf.get("model_type")
    if model_type in SUPPORTED_FAMILIES:
        return model_type
    raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
