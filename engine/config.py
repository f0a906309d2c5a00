"""Model configuration: one dataclass with explicit per-family fields.

Family differences (norm offset, embedding scale, activation, q/k/v bias, rope scaling, causal or
bidirectional attention, logit soft-capping, Gemma-2's extra norms, Qwen3's q/k norms, sliding
windows) are plain fields read from a Hugging Face ``config.json``; nothing downstream looks at the
family name or at a model's name.

Every field is validated where the config is built (from ``config.json`` or from an engine
directory's ``engine_config.json``): a wrong type, a non-finite number or a nonsensical size raises
:class:`ConfigError` naming the field, before anything is allocated from it.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3")
_CLASS_PREFIXES = {
    "llama": "Llama", "mistral": "Mistral", "gemma": "Gemma", "gemma2": "Gemma2", "qwen2": "Qwen2", "qwen3": "Qwen3",
}
_ARCHITECTURE_FAMILY = {
    f"{prefix}{suffix}": family
    for family, prefix in _CLASS_PREFIXES.items()
    for suffix in ("ForCausalLM", "Model")
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
ATTENTION_KINDS = ("bidirectional", "causal")
# Far beyond any released model; a config above these is a corrupt or hostile file, refused before
# anything is sized from it.
_LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_layers": 4096,
           "num_heads": 4096, "num_kv_heads": 4096, "head_dim": 1024, "max_position_embeddings": 1 << 24,
           "sliding_window": 1 << 24}


class ConfigError(ValueError):
    """A config that this engine cannot run, with the reason (naming the field)."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and per-family behaviour of a decoder run as an encoder.

    - ``norm_weight_offset``: 1.0 for Gemma's ``(1 + weight)`` RMSNorm; ``embedding_scale`` multiplies
      token embeddings (``sqrt(hidden_size)`` for Gemma); ``activation``: the MLP gate (``silu`` or
      ``gelu_tanh``); ``qkv_bias``: Qwen2's q/k/v bias; ``rope_scaling``: None or a ``llama3`` dict.
    - ``attention``: ``bidirectional`` (LLM2Vec, gte-Qwen2) or ``causal`` (e5-mistral, Qwen3-Embedding).
    - ``attn_logit_softcap``: Gemma-2's ``cap * tanh(score / cap)`` before the softmax (None: off);
      ``final_logit_softcap`` the same on LM-head logits (MNTP training only).
    - ``query_pre_attn_scalar``: the attention scale is ``query_pre_attn_scalar ** -0.5`` (Gemma-2)
      instead of ``head_dim ** -0.5``.
    - ``post_norms``: Gemma-2's extra RMSNorms on the attention output and on the MLP output, before
      each residual add (tensors ``post_attn_norm``, ``post_mlp_norm``).
    - ``qk_norm``: Qwen3's RMSNorm over each head's q and k (``q_norm``, ``k_norm`` [head_dim]) before rotary.
    - ``sliding_window`` / ``sliding_layers``: the layers (indices) that attend only within
      ``sliding_window`` tokens; see :meth:`layer_window`.
    - ``max_position_embeddings``: the context the model was trained for (None: unknown).
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
    attention: str = "bidirectional"
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    post_norms: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            _check_int(name, getattr(self, name))
        for name in ("max_position_embeddings", "sliding_window"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        for name in ("rms_norm_eps", "rope_theta", "embedding_scale"):
            _check_positive(name, getattr(self, name))
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not _is_number(self.norm_weight_offset):
            raise ConfigError(f"norm_weight_offset: expected a finite number, got {self.norm_weight_offset!r}")
        for name in ("qkv_bias", "tie_word_embeddings", "post_norms", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"activation: unsupported {self.activation!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention: expected one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        layers = self.sliding_layers
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ConfigError(f"sliding_layers: expected a list of layer indices, got {layers!r}")
        object.__setattr__(self, "sliding_layers", tuple(sorted(set(layers))))
        if any(not 0 <= i < self.num_layers for i in self.sliding_layers):
            raise ConfigError(f"sliding_layers: indices must be in [0, {self.num_layers}), got {list(layers)}")
        if self.sliding_layers and self.sliding_window is None:
            raise ConfigError("sliding_layers is set but sliding_window is not")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling))

    # Sizes of the fused projections the engine format stores.
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def causal(self) -> bool:
        return self.attention == "causal"

    @property
    def attention_scale(self) -> float:
        """Softmax scale: ``query_pre_attn_scalar ** -0.5`` where the family sets it, else ``head_dim ** -0.5``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> tuple[int, int] | None:
        """The keys layer ``layer`` may see around query position q, as ``(left, right)``: keys in
        ``[q - left, q + right]`` (None: the whole sequence, or up to q when causal).

        Transformers' conventions, which differ by direction: a causal window W sees the W - 1
        previous keys and itself (``q - k < W``); a bidirectional one sees ``|q - k| <= W``.
        """
        if self.sliding_window is None or layer not in self.sliding_layers:
            return None
        w = self.sliding_window
        return (w - 1, 0) if self.causal else (w, w)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sliding_layers"] = list(self.sliding_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object of model fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config fields: {sorted(unknown)}")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ConfigError(f"missing model config fields: {missing}")
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], attention: str | None = None, default_attention: str = "bidirectional") -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout).

        ``attention``: forced (a converter flag); otherwise the config's own ``is_causal`` or
        ``use_bidirectional_attention`` decide, else ``default_attention``.
        """
        if not isinstance(hf, dict):
            raise ConfigError(f"expected a JSON object, got {type(hf).__name__}")
        family = _family_of(hf)
        get = _Reader(hf)
        hidden = get.int("hidden_size")
        heads = get.int("num_attention_heads")
        head_dim = get.int("head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}; "
                                  "the config needs an explicit head_dim")
            head_dim = hidden // heads
        rope = get.dict("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if not _is_number(rope_theta) or rope_theta <= 0:
            raise ConfigError(f"field 'rope_theta': expected a positive number, got {rope_theta!r}")
        scaling = get.dict("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if family == "gemma" and act_name == "gelu":
            # Gemma's released configs say "gelu" but the model was trained with the tanh approximation.
            act_name = "gelu_pytorch_tanh"
        if not isinstance(act_name, str) or act_name not in _ACTIVATIONS:
            raise ConfigError(f"field 'hidden_act': unsupported activation {act_name!r}")
        is_gemma = family in ("gemma", "gemma2")
        num_layers = get.int("num_hidden_layers")
        kind = attention or _attention_of(hf) or default_attention
        if kind not in ATTENTION_KINDS:
            raise ConfigError(f"attention {kind!r}: expected one of {', '.join(ATTENTION_KINDS)}")
        window, window_layers = _sliding_windows(hf, family, num_layers, kind)
        eps = hf.get("rms_norm_eps", 1e-6)
        if not _is_number(eps) or eps <= 0:
            raise ConfigError(f"field 'rms_norm_eps': expected a positive number, got {eps!r}")
        try:
            return cls(
                family=family,
                vocab_size=get.int("vocab_size"),
                hidden_size=hidden,
                intermediate_size=get.int("intermediate_size"),
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=get.int("num_key_value_heads", heads),
                head_dim=head_dim,
                rms_norm_eps=float(eps),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                activation=_ACTIVATIONS[act_name],
                norm_weight_offset=1.0 if is_gemma else 0.0,
                embedding_scale=math.sqrt(hidden) if is_gemma else 1.0,
                qkv_bias=family == "qwen2" or get.bool("attention_bias", False),
                tie_word_embeddings=get.bool("tie_word_embeddings", is_gemma),
                attention=kind,
                attn_logit_softcap=get.float("attn_logit_softcapping", None) if family == "gemma2" else None,
                final_logit_softcap=get.float("final_logit_softcapping", None) if family == "gemma2" else None,
                query_pre_attn_scalar=get.float("query_pre_attn_scalar", None) if family == "gemma2" else None,
                post_norms=family == "gemma2",
                qk_norm=family == "qwen3",
                sliding_window=window,
                sliding_layers=window_layers,
                max_position_embeddings=get.int("max_position_embeddings", None),
            )
        except ConfigError as exc:
            raise ConfigError(f"config.json: {exc}") from None


def _family_of(hf: dict[str, Any]) -> str:
    architectures = hf.get("architectures") or []
    if isinstance(architectures, str) or not isinstance(architectures, list):
        raise ConfigError(f"field 'architectures': expected a list of class names, got {architectures!r}")
    for arch in architectures:
        if isinstance(arch, str) and arch in _ARCHITECTURE_FAMILY:
            return _ARCHITECTURE_FAMILY[arch]
    if architectures:
        raise ConfigError(
            f"unsupported architecture {architectures[0]!r}; supported: Llama, Mistral, Gemma, Gemma2, Qwen2, Qwen3 "
            "(*ForCausalLM or *Model)"
        )
    model_type = hf.get("model_type")
    if model_type in SUPPORTED_FAMILIES:
        return model_type
    raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")


def _attention_of(hf: dict[str, Any]) -> str | None:
    """What the config itself says: ``is_causal`` (gte-Qwen2) or ``use_bidirectional_attention``."""
    for key, causal_when in (("is_causal", True), ("use_bidirectional_attention", False)):
        value = hf.get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise ConfigError(f"field {key!r}: expected true or false, got {value!r}")
        return "causal" if value == causal_when else "bidirectional"
    return None


def _sliding_windows(hf: dict[str, Any], family: str, num_layers: int, attention: str) -> tuple[int | None, tuple[int, ...]]:
    """(window, layers that use it), as transformers applies them for this family and attention.

    Gemma-2 alternates (``layer_types``; by default even layers slide). Mistral's window is applied
    by transformers to causal attention only; LLM2Vec runs Mistral bidirectionally over the whole
    sequence, so a bidirectional Mistral ignores it. Qwen2/Qwen3 slide only with ``use_sliding_window``.
    """
    window = hf.get("sliding_window")
    if window is None:
        return None, ()
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"field 'sliding_window': expected a positive integer or null, got {window!r}")
    types = hf.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers or not all(isinstance(t, str) for t in types):
            raise ConfigError(f"field 'layer_types': expected {num_layers} layer type names, got {types!r}")
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ConfigError(f"field 'layer_types': unsupported layer types {unknown}")
    if family == "gemma2":
        if types is None:
            return window, tuple(range(0, num_layers, 2))
        return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if family == "mistral":
        return (window, tuple(range(num_layers))) if attention == "causal" else (None, ())
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window"):
            return None, ()
        if types is not None:
            return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        first = hf.get("max_window_layers", num_layers)
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ConfigError(f"field 'max_window_layers': expected a non-negative integer, got {first!r}")
        return window, tuple(range(min(first, num_layers), num_layers))
    return None, ()


class _Reader:
    """Typed access to config.json fields; a wrong type or value raises ConfigError naming the field.
    An absent or null field gives ``default`` (absent and required: ConfigError)."""

    _REQUIRED = object()

    def __init__(self, hf: dict[str, Any]) -> None:
        self.hf = hf

    def _get(self, name: str, default: Any) -> tuple[bool, Any]:
        value = self.hf.get(name)
        if value is None:
            if default is self._REQUIRED:
                raise ConfigError(f"config.json is missing the field {name!r}")
            return False, default
        return True, value

    def int(self, name: str, default: Any = _REQUIRED) -> Any:
        present, value = self._get(name, default)
        if not present:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"field {name!r}: expected a positive integer, got {value!r}")
        return value

    def float(self, name: str, default: Any = _REQUIRED) -> Any:
        present, value = self._get(name, default)
        if not present:
            return value
        if not _is_number(value) or value <= 0:
            raise ConfigError(f"field {name!r}: expected a positive number, got {value!r}")
        return float(value)

    def bool(self, name: str, default: Any = _REQUIRED) -> Any:
        present, value = self._get(name, default)
        if present and not isinstance(value, bool):
            raise ConfigError(f"field {name!r}: expected true or false, got {value!r}")
        return value

    def dict(self, name: str) -> dict[str, Any] | None:
        value = self.hf.get(name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"field {name!r}: expected a JSON object, got {value!r}")
        return value


def _rope_scaling(scaling: Any) -> dict[str, Any]:
    """The validated ``llama3`` scaling dict (the only scaling these families need)."""
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling: expected a JSON object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise ConfigError(f"rope_scaling: unsupported type {rope_type!r} (supported: llama3)")
    out: dict[str, Any] = {"rope_type": "llama3"}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        value = scaling.get(key)
        if not _is_number(value) or value <= 0:
            raise ConfigError(f"rope_scaling.{key}: expected a positive number, got {value!r}")
        out[key] = float(value)
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ConfigError("rope_scaling: high_freq_factor must exceed low_freq_factor")
    original = scaling.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise ConfigError(f"rope_scaling.original_max_position_embeddings: expected a positive integer, got {original!r}")
    out["original_max_position_embeddings"] = original
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    if value > _LIMITS[name]:
        raise ConfigError(f"{name}={value} is beyond any supported model (limit {_LIMITS[name]})")


def _check_positive(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{name}: expected a positive finite number, got {value!r}")
