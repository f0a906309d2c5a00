"""The engine's on-disk format (written by ``converters.hf2engine``, read by :class:`engine.Engine`).

A directory holding:
- ``engine_config.json``: format name and version, the :class:`ModelConfig`, the stored dtype, the
  input and pooling defaults (pooling mode, ``include_prompt``, ``append_eos``, ``normalize``,
  ``max_length``, named ``prompts``), whether an LM head is stored, and the sources (every input
  file with its sha256, and the LoRA adapters merged, in order).
- ``weights.index.json``: ``weight_map`` (tensor name -> shard file) and, in ``metadata``, the
  ``total_size`` and the ``sha256`` of every shard.
- ``weights-NNNNN.safetensors``: tensors named as :class:`EncoderModel`'s state dict, with q/k/v fused
  into ``layers.N.qkv`` and gate/up into ``layers.N.gate_up``. Each shard's safetensors metadata
  records the sha256 of the model config it was written for (:func:`model_config_hash`), so that a
  config edited after conversion is refused at load instead of mis-reading the weights.
- the tokenizer files copied from the source checkpoint.

Every reader here raises :class:`FormatError` naming the file and the field, never a raw error.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .choices import DTYPE_NAMES, POOLING_MODES
from .config import ConfigError, ModelConfig

FORMAT_NAME = "llm-encoder-engine"
FORMAT_VERSION = 2
ENGINE_CONFIG = "engine_config.json"
WEIGHTS_INDEX = "weights.index.json"
SHARD_CONFIG_KEY = "engine_model_config_sha256"  # in every shard's safetensors metadata
# Public pooling names: how an embedding is read from the final hidden states.
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
_FLOAT_TAGS = {torch.float32, torch.float16, torch.bfloat16}


class FormatError(ValueError):
    """A directory that is not a readable engine checkpoint, with the reason (file and field)."""


def model_config_hash(model: ModelConfig) -> str:
    """sha256 of the model config's canonical JSON: what the weights were written for."""
    canonical = json.dumps(model.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def shard_metadata(model: ModelConfig) -> dict[str, str]:
    """The safetensors metadata every weight shard carries. One key only: safetensors writes its
    metadata from a hash map, so several keys would come out in varying order and conversions would
    no longer be byte-identical."""
    return {SHARD_CONFIG_KEY: model_config_hash(model)}


@dataclass
class EngineConfig:
    """``engine_config.json``.

    Input and pooling defaults: ``pooling`` (see ``POOLING_MODES``); ``include_prompt`` False pools
    only the text's own tokens (the LLM2Vec rule: never an instruction, prompt or special token),
    True pools every token the model read, as sentence-transformers does with ``include_prompt``;
    ``append_eos`` appends the EOS token after truncation to ``max_length - 1`` (e5-mistral's
    last-token recipe; never when the tokenizer appends it already); ``normalize`` L2-normalises by
    default (a sentence-transformers ``Normalize`` module); ``prompts``: named prompts prepended to
    the text (``config_sentence_transformers.json``), ``default_prompt_name`` the one used when none
    is asked for.
    """

    model: ModelConfig
    dtype: str
    pooling: str = "mean"
    max_length: int = 512
    include_prompt: bool = False
    append_eos: bool = False
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    has_lm_head: bool = False
    sources: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise FormatError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.pooling not in POOLING_MODES:
            raise FormatError(f"pooling: expected one of {', '.join(POOLING_MODES)}, got {self.pooling!r}")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 1:
            raise FormatError(f"max_length: expected a positive integer, got {self.max_length!r}")
        if self.append_eos and self.max_length < 2:
            raise FormatError("max_length: append_eos needs at least 2 tokens (the text and the EOS)")
        for name in ("include_prompt", "append_eos", "normalize", "has_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise FormatError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if not isinstance(self.prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.prompts.items()
        ):
            raise FormatError(f"prompts: expected an object of name -> prompt strings, got {self.prompts!r}")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise FormatError(f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts "
                              f"({', '.join(sorted(self.prompts)) or 'none'})")
        if not isinstance(self.sources, dict):
            raise FormatError(f"sources: expected a JSON object, got {type(self.sources).__name__}")

    def to_json(self) -> str:
        data = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}
        data["model"] = self.model.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: str | Path) -> "EngineConfig":
        path = Path(path)
        file = path / ENGINE_CONFIG
        if not path.is_dir():
            raise FormatError(f"{path}: not a directory" if path.exists() else f"{path}: no such directory")
        if not file.is_file():
            raise FormatError(f"{path}: no {ENGINE_CONFIG}; convert a checkpoint with `python -m converters.hf2engine`")
        data = read_json(file)
        if not isinstance(data, dict):
            raise FormatError(f"{file}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise FormatError(f"{file}: not a {FORMAT_NAME} config (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise FormatError(f"{file}: format_version {data.get('format_version')!r}; this engine reads version "
                              f"{FORMAT_VERSION}: convert the checkpoint again with `python -m converters.hf2engine`")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"format", "format_version"})
        if unknown:
            raise FormatError(f"{file}: unknown fields {unknown}")
        for required in ("model", "dtype"):
            if required not in data:
                raise FormatError(f"{file}: missing the field {required!r}")
        try:
            model = ModelConfig.from_dict(data["model"])
        except ConfigError as exc:
            raise FormatError(f"{file}: model: {exc}") from None
        values = {k: v for k, v in data.items() if k in known and k != "model"}
        try:
            return cls(model=model, **values)
        except FormatError as exc:
            raise FormatError(f"{file}: {exc}") from None


def read_json(file: Path) -> Any:
    """Parsed JSON of ``file``; FormatError naming the file for unreadable, non-UTF-8 or invalid JSON."""
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise FormatError(f"{file}: unreadable ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise FormatError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise FormatError(f"{file}: invalid JSON ({exc})") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


@dataclass(frozen=True)
class WeightIndex:
    """``weights.index.json``: tensor name -> shard file, and each shard's recorded sha256."""

    weight_map: dict[str, str]
    sha256: dict[str, str]

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def read_index(path: str | Path) -> WeightIndex:
    index = Path(path) / WEIGHTS_INDEX
    if not index.is_file():
        raise FormatError(f"{index}: missing")
    data = read_json(index)
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise FormatError(f"{index}: weight_map: expected an object of tensor name -> shard file")
    weight_map = data["weight_map"]
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise FormatError(f"{index}: weight_map[{name!r}]: expected a shard file name in the directory, got {file!r}")
    meta = data.get("metadata", {})
    sha = meta.get("sha256", {}) if isinstance(meta, dict) else None
    if not isinstance(sha, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sha.items()):
        raise FormatError(f"{index}: metadata.sha256: expected an object of shard file -> hex digest")
    return WeightIndex(dict(weight_map), dict(sha))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shards(path: str | Path, index: WeightIndex) -> None:
    """Check every shard's sha256 against ``weights.index.json``'s record (reads every byte)."""
    path = Path(path)
    for file in index.files:
        recorded = index.sha256.get(file)
        if recorded is None:
            raise FormatError(f"{path / WEIGHTS_INDEX}: no sha256 recorded for {file}; cannot verify")
        try:
            actual = sha256_file(path / file)
        except OSError as exc:
            raise FormatError(f"{path / file}: unreadable ({exc.strerror or exc})") from None
        if actual != recorded:
            raise FormatError(f"{path / file}: sha256 {actual[:16]}... differs from the recorded {recorded[:16]}... "
                              "(the file changed after conversion)")


def load_state_dict(
    path: str | Path,
    expected: dict[str, tuple[int, ...]],
    config_hash: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    index: WeightIndex | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of ``expected`` (name -> shape), read shard by shard (memory-mapped) straight onto
    ``device`` and cast to ``dtype`` (``None`` keeps the stored dtype).

    Refused with :class:`FormatError` before any tensor is read: a missing or unexpected tensor, a
    shard written for another model config than ``config_hash``; while reading: a wrong shape or a
    non-float dtype. On the CPU every tensor ends in memory of its own, never inside the file mapping
    (the cast makes that copy; an uncast tensor is cloned): matrix products read a tensor left in the
    mapping ~1.5x slower (measured on the benchmark model's MLP weights).
    """
    path = Path(path)
    index = read_index(path) if index is None else index
    names = set(index.weight_map)
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        raise FormatError(f"{path / WEIGHTS_INDEX}: weights do not match {ENGINE_CONFIG} "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    by_file: dict[str, list[str]] = {}
    for name, file in sorted(index.weight_map.items()):
        by_file.setdefault(file, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, file_names in sorted(by_file.items()):
        shard = path / file
        try:
            handle = safe_open(str(shard), framework="pt", device=str(device))
        except Exception as exc:  # safetensors raises several types for a missing or damaged file
            raise FormatError(f"{shard}: cannot read weights ({' '.join(str(exc).split())})") from None
        with handle as f:
            recorded = (f.metadata() or {}).get(SHARD_CONFIG_KEY)
            if recorded != config_hash:
                raise FormatError(f"{shard}: written for another model config than {ENGINE_CONFIG} describes "
                                  "(the config was edited after conversion?); convert the checkpoint again")
            stored = set(f.keys())
            for name in file_names:
                if name not in stored:
                    raise FormatError(f"{shard}: missing tensor {name!r} (listed in {WEIGHTS_INDEX})")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise FormatError(f"{shard}: tensor {name!r} has shape {list(shape)}, the config needs "
                                      f"{list(expected[name])}")
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:
                    raise FormatError(f"{shard}: cannot read tensor {name!r} ({' '.join(str(exc).split())})") from None
                if tensor.dtype not in _FLOAT_TAGS:
                    raise FormatError(f"{shard}: tensor {name!r} has dtype {tensor.dtype}; expected a float dtype")
                if dtype is not None and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                elif tensor.device.type == "cpu":
                    tensor = tensor.clone()
                tensors[name] = tensor
    return tensors
