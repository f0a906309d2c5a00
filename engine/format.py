"""The engine's on-disk format (written by ``converters.hf2engine``, read by :class:`engine.Engine`).

A directory holding:
- ``engine_config.json``: format name and version, the :class:`ModelConfig`, the stored dtype, the
  pooling defaults (mode, max_length), whether an LM head is stored, and the sources (every input file
  with its sha256, and the LoRA adapters merged, in order).
- ``weights.index.json`` + ``weights-NNNNN.safetensors``: tensors named as :class:`EncoderModel`'s
  state dict, with q/k/v fused into ``layers.N.qkv`` and gate/up into ``layers.N.gate_up``.
- the tokenizer files copied from the source checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .config import ModelConfig

FORMAT_NAME = "llm-encoder-engine"
FORMAT_VERSION = 1
ENGINE_CONFIG = "engine_config.json"
WEIGHTS_INDEX = "weights.index.json"
# Public pooling names: how an embedding is read from the final hidden states.
ENCODE_POOLING = ("mean", "weighted_mean", "last_token", "bos_token")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FormatError(ValueError):
    """A directory that is not a readable engine checkpoint, with the reason."""


@dataclass
class EngineConfig:
    model: ModelConfig
    dtype: str
    pooling: str = "mean"
    max_length: int = 512
    has_lm_head: bool = False
    sources: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}
        data["model"] = self.model.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: str | Path) -> "EngineConfig":
        path = Path(path)
        file = path / ENGINE_CONFIG
        if not path.is_dir():
            raise FormatError(f"{path}: not a directory")
        if not file.is_file():
            raise FormatError(f"{path}: no {ENGINE_CONFIG}; convert a checkpoint with `python -m converters.hf2engine`")
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FormatError(f"{file}: unreadable ({exc})") from None
        if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
            raise FormatError(f"{file}: not a {FORMAT_NAME} v{FORMAT_VERSION} config")
        try:
            cfg = cls(
                model=ModelConfig.from_dict(data["model"]),
                dtype=data["dtype"],
                pooling=data["pooling"],
                max_length=int(data["max_length"]),
                has_lm_head=bool(data["has_lm_head"]),
                sources=data.get("sources", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{file}: invalid ({exc})") from None
        if cfg.dtype not in DTYPES:
            raise FormatError(f"{file}: unknown dtype {cfg.dtype!r}")
        if cfg.pooling not in ENCODE_POOLING:
            raise FormatError(f"{file}: unknown pooling {cfg.pooling!r}")
        return cfg


def weight_files(path: str | Path) -> dict[str, str]:
    """Tensor name -> shard file name, from ``weights.index.json``."""
    index = Path(path) / WEIGHTS_INDEX
    try:
        return json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise FormatError(f"{index}: unreadable weight index ({exc})") from None


def load_state_dict(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every stored tensor, read shard by shard (memory-mapped) straight onto ``device`` and cast to
    ``dtype`` (``None`` keeps the stored dtype).

    On the CPU every tensor ends in memory of its own, never inside the file mapping (the cast makes
    that copy; an uncast tensor is cloned): a tensor left in the mapping sits on 8-byte-aligned 4 KiB
    file pages, and matrix products read it ~1.5x slower than from the allocator's aligned memory
    (measured on the benchmark model's MLP weights).
    """
    path = Path(path)
    by_file: dict[str, list[str]] = {}
    for name, file in weight_files(path).items():
        by_file.setdefault(file, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in sorted(by_file.items()):
        try:
            with safe_open(str(path / file), framework="pt", device=str(device)) as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    if dtype is not None and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    elif tensor.device.type == "cpu":
                        tensor = tensor.clone()
                    tensors[name] = tensor
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise FormatError(f"{path / file}: cannot read weights ({exc})") from None
    return tensors
