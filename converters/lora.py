"""PEFT LoRA adapters: validated up front, merged per tensor during conversion.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.mlp.down_proj.lora_A.weight`` (saved from a ``*ForCausalLM``) or
``base_model.model.layers.0.mlp.down_proj.lora_A.weight`` (saved from a bare ``*Model``, as LLM2Vec
does); both apply to either kind of checkpoint. ``lora_A`` is [r, in], ``lora_B`` is [out, r] and the
merge is ``W += scale * B @ A`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), exactly
as ``peft``'s ``merge_and_unload`` computes it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.config import _CLASS_PREFIXES

from .sources import CONFIG_FILE, PICKLE_SUFFIXES, ConversionError, TensorInfo, all_finite, file_hashes, read_header, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LLM2VEC_CONFIG = "llm2vec_config.json"
# Linear layers we merge into, by PEFT target name -> the block that holds them.
LORA_MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# LLM2Vec pooling_mode -> engine pooling.
LLM2VEC_POOLING = {
    "mean": "mean",
    "weighted_mean": "weighted_mean",
    "eos_token": "last_token",
    "last_token": "last_token",
    "bos_token": "bos_token",
}
# What follows a family's class-name prefix in transformers' classes and LLM2Vec's bidirectional ones
# (MistralBiModel, LlamaBiForMNTP): "Qwen2MoeForCausalLM" is not Qwen2.
_CLASS_SUFFIXES = ("ForCausalLM", "Model", "PreTrainedModel", "BiModel", "BiForMNTP", "ForSequenceClassification",
                   "ForTokenClassification", "ForQuestionAnswering")
# Base-weight-modifying initialisations: the adapter only makes sense on a base we do not have.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# adapter keys: optional "model." (CausalLM), layer, block, projection, A/B, optional adapter name.
_KEY = re.compile(
    r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+?)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


@dataclass
class LoraModule:
    """One adapted linear layer: its A/B tensors and merge scale."""

    layer: int
    proj: str  # "q_proj", ..., "down_proj"
    a: TensorInfo
    b: TensorInfo
    a_key: str
    b_key: str
    r: int
    alpha: float
    scale: float


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    modules: dict[tuple[int, str], LoraModule]
    llm2vec: dict[str, Any] | None

    @classmethod
    def open(cls, path: str | Path) -> "Adapter":
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ConversionError(f"{path}: no such adapter directory" if not path.exists() else f"{path}: not a directory")
        path = path.resolve()
        config = read_json(path / ADAPTER_CONFIG, what="a PEFT adapter directory needs adapter_config.json")
        if not isinstance(config, dict):
            raise ConversionError(f"{path / ADAPTER_CONFIG}: not a JSON object")
        _check_config(path, config)
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise ConversionError(
                    f"{path}: only pickled adapter weights ({', '.join(pickled)}); they are never unpickled here. "
                    f"Convert them to {ADAPTER_WEIGHTS} first"
                )
            raise ConversionError(f"{weights}: missing")
        header = read_header(weights)
        modules = _modules(path, config, header)
        llm2vec = None
        if (path / LLM2VEC_CONFIG).is_file():
            llm2vec = read_json(path / LLM2VEC_CONFIG)
            if not isinstance(llm2vec, dict):
                raise ConversionError(f"{path / LLM2VEC_CONFIG}: not a JSON object")
        return cls(path, config, modules, llm2vec)

    def check_against(self, num_layers: int, expected_shapes: dict[str, tuple[int, int]]) -> None:
        """Refuse an adapter made for another model: layers it does not have or A/B of the wrong size.

        ``expected_shapes``: projection name -> base weight shape [out, in].
        """
        for (layer, proj), m in sorted(self.modules.items()):
            if layer >= num_layers:
                raise ConversionError(
                    f"{self.path}: adapter made for another model: {m.a_key} names layer {layer} "
                    f"but the model has {num_layers} layers"
                )
            out_f, in_f = expected_shapes[proj]
            if m.a.shape[1] != in_f or m.b.shape[0] != out_f:
                raise ConversionError(
                    f"{self.path}: adapter made for another model: {m.a_key.split('.lora_A')[0]}"
                    f" lora_A {list(m.a.shape)} / lora_B {list(m.b.shape)} do not fit a [{out_f}, {in_f}] weight"
                )

    def load_layer(self, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """proj -> (A float32 [r, in], B float32 [out, r], scale) for one layer (read memory-mapped)."""
        wanted = [m for (lay, _), m in sorted(self.modules.items()) if lay == layer]
        if not wanted:
            return {}
        out = {}
        file = self.path / ADAPTER_WEIGHTS
        with _open(file) as f:
            for m in wanted:
                a, b = f.get_tensor(m.a_key), f.get_tensor(m.b_key)
                for key, t in ((m.a_key, a), (m.b_key, b)):
                    if not all_finite(t):
                        raise ConversionError(f"{file}: tensor {key!r} holds NaN or Inf values")
                out[m.proj] = (a.float(), b.float(), m.scale)
        return out

    def check_family(self, family: str, src: Path) -> None:
        """Refuse an adapter whose recorded base is clearly of another family than ``family`` (SRC's):
        equal shapes do not make a Mistral adapter fit a Llama. ``auto_mapping.base_model_class`` (peft
        writes it; LLM2Vec's ``MistralBiModel``) and a local ``base_model_name_or_path`` with a
        config.json are read; a hub id or an unknown class proves nothing and is let through."""
        where = self.path / ADAPTER_CONFIG
        claims = []
        mapping = self.config.get("auto_mapping")
        if isinstance(mapping, dict) and isinstance(mapping.get("base_model_class"), str):
            cls = mapping["base_model_class"]
            claims.append((f"auto_mapping.base_model_class {cls!r}", family_of_class(cls)))
        base = self.config.get("base_model_name_or_path")
        if isinstance(base, str) and base:
            local = Path(base).expanduser()
            try:
                is_model_dir = (local / CONFIG_FILE).is_file() and local.resolve() != src.resolve()
            except OSError:
                is_model_dir = False
            if is_model_dir:
                try:
                    claims.append((f"base_model_name_or_path {base!r}", family_of_config(read_json(local / CONFIG_FILE))))
                except ConversionError:
                    pass  # an unreadable base config proves nothing either way
        for what, claimed in claims:
            if claimed is not None and claimed != family:
                raise ConversionError(
                    f"{where}: adapter made for another model family: {what} is {claimed}, SRC ({src}) is {family}"
                )

    def source_record(self) -> dict[str, Any]:
        files = [self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS]
        if self.llm2vec is not None:
            files.append(self.path / LLM2VEC_CONFIG)
        return {
            "path": str(self.path),
            "files": file_hashes(files, self.path),
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora", False)),
        }


def merge(weight: torch.Tensor, deltas: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """``weight`` upcast to float32 plus each ``scale * (B @ A)`` in order (float32; the caller casts once)."""
    out = weight.to(torch.float32, copy=True)
    for a, b, scale in deltas:
        out += (b @ a) * scale
    return out


def pooling_defaults(llm2vec: dict[str, Any], where: Path) -> dict[str, Any]:
    """``{"pooling": ..., "max_length": ...}`` (whichever are set) from an LLM2Vec config."""
    out: dict[str, Any] = {}
    mode = llm2vec.get("pooling_mode")
    if mode is not None:
        if mode not in LLM2VEC_POOLING:
            raise ConversionError(
                f"{where}: unsupported pooling_mode {mode!r}; supported: {', '.join(LLM2VEC_POOLING)}"
            )
        out["pooling"] = LLM2VEC_POOLING[mode]
    max_length = llm2vec.get("max_length")
    if max_length is not None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ConversionError(f"{where}: max_length {max_length!r} is not a positive integer")
        out["max_length"] = max_length
    return out


def family_of_class(name: str) -> str | None:
    """The model family (transformers' ``model_type``) of a model class name, or None if unknown."""
    for prefix in sorted(_CLASS_PREFIXES.values(), key=len, reverse=True):
        if name.startswith(prefix) and name[len(prefix) :] in _CLASS_SUFFIXES:
            return next(f for f, p in _CLASS_PREFIXES.items() if p == prefix)
    try:  # another transformers architecture (a Phi adapter on a Llama): its model_type
        from transformers.models.auto import modeling_auto
    except Exception:  # transformers missing or broken: cannot tell
        return None
    for mapping in (modeling_auto.MODEL_MAPPING_NAMES, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        for model_type, classes in mapping.items():
            if name == classes or (isinstance(classes, (list, tuple)) and name in classes):
                return model_type
    return None


def family_of_config(config: Any) -> str | None:
    """The family a Hugging Face config.json describes (its first architecture, else model_type)."""
    if not isinstance(config, dict):
        return None
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        found = family_of_class(architectures[0])
        if found is not None:
            return found
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) and model_type else None


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError and OSError alike
        raise ConversionError(f"{path}: truncated or corrupt ({exc})") from None


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse, by name, every PEFT feature a plain ``W += scale * B @ A`` merge would get wrong."""
    where = path / ADAPTER_CONFIG
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ConversionError(f"{where}: peft_type {peft_type!r} is not supported (only LORA adapters can be merged)")
    refusals = [
        (config.get("use_dora"), "DoRA (use_dora=true) is not supported; only plain LoRA can be merged"),
        (config.get("fan_in_fan_out"), "fan_in_fan_out=true is not supported (Conv1D-style weights)"),
        (config.get("bias", "none") != "none", f"LoRA bias (bias={config.get('bias')!r}) is not supported; only bias='none'"),
        (config.get("lora_bias"), "LoRA bias (lora_bias=true) is not supported"),
        (config.get("modules_to_save"), f"modules_to_save={config.get('modules_to_save')!r} is not supported (fully trained extra modules)"),
        (config.get("trainable_token_indices"), "trainable_token_indices (embedding token training) is not supported"),
        (config.get("layer_replication"), "layer_replication is not supported"),
        (config.get("target_parameters"), "target_parameters (LoRA on parameters) is not supported"),
        (config.get("use_qalora"), "QALoRA (use_qalora=true) is not supported"),
        (config.get("alora_invocation_tokens"), "activated LoRA (alora_invocation_tokens) is not supported"),
        (config.get("use_bdlora"), "use_bdlora is not supported"),
    ]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        refusals.append((True, f"init_lora_weights={init!r} changes the base weights and is not supported"))
    for bad, message in refusals:
        if bad:
            raise ConversionError(f"{where}: {message}")
    _check_types(where, config)
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        names = [t.rsplit(".", 1)[-1] for t in targets]
        for bad in ("embed_tokens", "lm_head"):
            if bad in names:
                raise ConversionError(f"{where}: LoRA on {bad} (target_modules) is not supported")
        other = sorted(set(names) - set(LORA_MODULES))
        if other:
            raise ConversionError(
                f"{where}: target modules {other} are not supported; supported: {', '.join(LORA_MODULES)}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _regex(where: Path, field: str, pattern: str, as_suffix: bool = False) -> None:
    """``pattern`` compiles as peft uses it (whole, or as a module-name suffix in rank/alpha patterns)."""
    try:
        re.compile(rf"(.*\.)?({pattern})$" if as_suffix else pattern)
    except re.error as exc:
        raise ConversionError(f"{where}: {field}: {pattern!r} is not a valid regular expression ({exc})") from None


def _check_types(where: Path, config: dict[str, Any]) -> None:
    """The fields the merge reads, each of the type and range peft gives it, refused by name otherwise."""
    r = config.get("r")
    if not _is_int(r) or r < 1:
        raise ConversionError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if not _is_finite(alpha):
        raise ConversionError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ConversionError(f"{where}: use_rslora must be true or false, got {config['use_rslora']!r}")
    for field, valid, what in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "a positive integer"),
                               ("alpha_pattern", _is_finite, "a finite number")):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise ConversionError(f"{where}: {field} must be a JSON object of module pattern -> value, got {patterns!r}")
        for key, value in patterns.items():
            _regex(where, field, key, as_suffix=True)
            if not valid(value):
                raise ConversionError(f"{where}: {field}[{key!r}] must be {what}, got {value!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _regex(where, "target_modules", targets)
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)):
        raise ConversionError(f"{where}: target_modules must be a list of module names or a regular expression, got {targets!r}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern that matches the end of the module's name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _modules(path: Path, config: dict[str, Any], header: dict[str, TensorInfo]) -> dict[tuple[int, str], LoraModule]:
    weights = path / ADAPTER_WEIGHTS
    pairs: dict[tuple[int, str], dict[str, tuple[str, TensorInfo]]] = {}
    for key, info in sorted(header.items()):
        if "modules_to_save" in key:
            raise ConversionError(f"{weights}: modules_to_save tensors are not supported ({key})")
        if "lora_embedding" in key or ".embed_tokens." in key or ".lm_head." in key:
            what = "embed_tokens" if "embed" in key else "lm_head"
            raise ConversionError(f"{weights}: LoRA on {what} is not supported ({key})")
        match = _KEY.match(key)
        if match is None:
            if not (".lora_A" in key or ".lora_B" in key):
                raise ConversionError(f"{weights}: unsupported adapter tensor {key!r} (only LoRA A/B of linear layers)")
            raise ConversionError(f"{weights}: unexpected adapter tensor {key!r} (not a layers.N.<block>.<proj> LoRA)")
        layer, block, proj, ab = int(match[1]), match[2], match[3], match[4]
        if proj not in LORA_MODULES or LORA_MODULES[proj] != block:
            raise ConversionError(
                f"{weights}: LoRA on {block}.{proj} is not supported; supported: {', '.join(LORA_MODULES)}"
            )
        if len(info.shape) != 2:
            raise ConversionError(f"{weights}: {key} has shape {list(info.shape)}, expected a matrix")
        slot = pairs.setdefault((layer, proj), {})
        if ab in slot:
            raise ConversionError(f"{weights}: two lora_{ab} tensors for layers.{layer}.{block}.{proj}")
        slot[ab] = (key, info)
    if not pairs:
        raise ConversionError(f"{weights}: no LoRA tensors")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = {}
    for (layer, proj), slot in sorted(pairs.items()):
        block = LORA_MODULES[proj]
        if set(slot) != {"A", "B"}:
            missing = "lora_B" if "A" in slot else "lora_A"
            raise ConversionError(f"{weights}: layers.{layer}.{block}.{proj} has no {missing} tensor")
        (a_key, a), (b_key, b) = slot["A"], slot["B"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise ConversionError(f"{weights}: {a_key} {list(a.shape)} and {b_key} {list(b.shape)} disagree on the rank")
        # peft matches patterns against the module name inside the wrapped model.
        module = a_key[len("base_model.model.") :].split(".lora_A")[0]
        r_config = _pattern_value(rank_pattern, module, config.get("r"))
        if r_config != r:
            raise ConversionError(f"{weights}: {a_key} has rank {r} but adapter_config.json says r={r_config}")
        alpha = _pattern_value(alpha_pattern, module, config.get("lora_alpha"))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[(layer, proj)] = LoraModule(layer, proj, a, b, a_key, b_key, r, float(alpha), scale)
    return modules
