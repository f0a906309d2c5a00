"""Reading a local Hugging Face checkpoint without trusting it.

Only the safetensors headers are read up front (8-byte length + JSON), and every tensor's byte range
is checked against its dtype, shape and the file's size, so that a truncated or corrupt shard is
reported before anything is written. Tensor data is read later, one layer at a time, through
``safe_open`` (memory-mapped). Pickled weight files (``*.bin``, ``*.pt``, ``*.pth``) are never opened.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from engine.format import sha256_file

CONFIG_FILE = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Copied into the engine directory when present; tokenizer.json is required (offsets need a fast tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# safetensors dtype tag -> (torch dtype, bytes per element).
SAFE_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class ConversionError(ValueError):
    """A user-facing conversion failure; ``str(err)`` is the one line printed by the CLI."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard, safetensors dtype tag and shape (from the header only)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> :class:`TensorInfo` from a safetensors file's header, fully validated.

    Checks the header length, the JSON, each entry's dtype/shape/offsets, that byte ranges match
    ``numel * itemsize`` and that the data section is exactly covered by the file.
    """
    def corrupt(why: str) -> ConversionError:
        return ConversionError(f"{path}: truncated or corrupt ({why})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"file is {size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise corrupt(f"header length {n} does not fit in a file of {size} bytes")
            raw = f.read(n)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for {name!r}") from None
        if dtype not in SAFE_DTYPES:
            raise corrupt(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise corrupt(f"tensor {name!r} has invalid data offsets {[begin, end]}")
        if any(d < 0 for d in shape):
            raise corrupt(f"tensor {name!r} has a negative dimension {list(shape)}")
        expected = math.prod(shape) * SAFE_DTYPES[dtype][1]
        if end - begin != expected:
            raise corrupt(f"tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} needs {expected}")
        if end > data_size:
            raise corrupt(f"tensor {name!r} ends at byte {end} of a {data_size}-byte data section")
        end_max = max(end_max, end)
        out[name] = TensorInfo(path, dtype, shape)
    if end_max != data_size:
        raise corrupt(f"data section is {data_size} bytes but its tensors cover {end_max}")
    return out


@dataclass
class Checkpoint:
    """A local Hugging Face checkpoint directory: its config and where every tensor lives."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    tensors: dict[str, TensorInfo]
    index_file: Path | None = None
    tokenizer_files: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, src: str | Path) -> "Checkpoint":
        path = Path(src).expanduser()
        if not path.exists():
            raise ConversionError(f"{path}: no such directory")
        if not path.is_dir():
            raise ConversionError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
        path = path.resolve()
        config = read_json(path / CONFIG_FILE, what="a Hugging Face checkpoint directory needs config.json")
        index_file = None
        if (path / SAFE_INDEX).is_file():
            index_file = path / SAFE_INDEX
            index = read_json(index_file)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_file}: no weight_map")
            for tensor, name in weight_map.items():
                if not isinstance(name, str) or not name or Path(name).name != name:
                    raise ConversionError(f"{index_file}: weight_map[{tensor!r}]: invalid shard name {name!r}")
            names = sorted(set(weight_map.values()))
            files = [path / name for name in names]
            for file in files:
                if not file.is_file():
                    raise ConversionError(f"{file}: listed in {SAFE_INDEX} but missing")
        elif (path / SAFE_SINGLE).is_file():
            weight_map, files = None, [path / SAFE_SINGLE]
        else:
            pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise ConversionError(
                    f"{path}: only pickled weights ({', '.join(pickled)}); they are never unpickled here. "
                    "Convert them to safetensors first (e.g. load with transformers and save_pretrained(..., "
                    "safe_serialization=True) in a trusted environment)"
                )
            raise ConversionError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX}")
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in tensors:
                    raise ConversionError(f"{file}: tensor {name!r} also stored in {tensors[name].file.name}")
                tensors[name] = info
        if weight_map is not None:
            for name, file_name in sorted(weight_map.items()):
                if name not in tensors:
                    raise ConversionError(f"{path / file_name}: missing tensor {name!r} (listed in {SAFE_INDEX})")
                if tensors[name].file.name != file_name:
                    raise ConversionError(
                        f"{index_file}: tensor {name!r} is listed in {file_name} but stored in {tensors[name].file.name}"
                    )
        if not (path / "tokenizer.json").is_file():
            raise ConversionError(
                f"{path}: no tokenizer.json; the engine needs a fast tokenizer (for offsets). Save one with "
                "AutoTokenizer.from_pretrained(...).save_pretrained(SRC)"
            )
        tokenizer_files = [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
        return cls(path, config, files, tensors, index_file, tokenizer_files)

    def input_files(self) -> list[Path]:
        """Every file the conversion reads, for the provenance record."""
        files = [self.path / CONFIG_FILE, *self.weight_files, *self.tokenizer_files]
        if self.index_file is not None:
            files.append(self.index_file)
        return sorted(set(files))


def read_json(path: Path, what: str = "") -> Any:
    if not path.is_file():
        raise ConversionError(f"{path}: missing" + (f" ({what})" if what else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: unreadable JSON ({exc})") from None


def file_hashes(files: Iterable[Path], root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(files)}


_LAYER_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
_FINITE_CHUNK = 1 << 24  # elements per isfinite pass: bounded scratch memory for any tensor size


def check_layer_count(ckpt: Checkpoint, num_layers: int) -> None:
    """Refuse a config.json whose ``num_hidden_layers`` is not what the weights hold, before any
    per-layer table is sized from it (a hostile config cannot make us allocate)."""
    present = {int(m[1]) for name in ckpt.tensors if (m := _LAYER_NAME.match(name))}
    held = max(present) + 1 if present else 0
    if held != num_layers:
        raise ConversionError(
            f"{ckpt.path / CONFIG_FILE}: num_hidden_layers={num_layers} but the weights hold "
            f"{held} layer{'s' if held != 1 else ''}"
        )
    missing = sorted(set(range(num_layers)) - present)
    if missing:
        raise ConversionError(f"{ckpt.path}: the weights have no tensors for layer {missing[0]} (of {num_layers})")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t`` (checked in chunks, so scratch memory stays small for a huge tensor)."""
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(_FINITE_CHUNK))


def check_tokenizer(ckpt: Checkpoint, vocab_size: int) -> None:
    """``tokenizer.json`` must parse, and no token id (its vocabulary and added tokens, and those of
    ``tokenizer_config.json`` / ``added_tokens.json``, which transformers adds too) may reach
    ``vocab_size``: such a token has no embedding row, and would fail or read garbage at encode."""
    from tokenizers import Tokenizer

    file = ckpt.path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises its own exception types for a damaged file
        raise ConversionError(f"{file}: cannot be parsed as a tokenizer ({' '.join(str(exc).split())[:200]})") from None
    ids: dict[int, tuple[str, Path]] = {i: (t, file) for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    config = ckpt.path / "tokenizer_config.json"
    if config.is_file():
        data = read_json(config)
        decoder = data.get("added_tokens_decoder") if isinstance(data, dict) else None
        if decoder is not None and not isinstance(decoder, dict):
            raise ConversionError(f"{config}: added_tokens_decoder: expected a JSON object, got {type(decoder).__name__}")
        for key, entry in (decoder or {}).items():
            if not key.isdigit():
                raise ConversionError(f"{config}: added_tokens_decoder: token id {key!r} is not a non-negative integer")
            content = entry.get("content") if isinstance(entry, dict) else None
            ids.setdefault(int(key), (str(content), config))
    added = ckpt.path / "added_tokens.json"
    if added.is_file():
        data = read_json(added)
        if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data.values()):
            raise ConversionError(f"{added}: expected a JSON object of token -> non-negative id")
        for token, i in data.items():
            ids.setdefault(i, (token, added))
    if not ids:
        raise ConversionError(f"{file}: the tokenizer has no tokens")
    top = max(ids)
    if top >= vocab_size:
        token, where = ids[top]
        raise ConversionError(
            f"{where}: token id {top} ({token!r}) is outside the model's vocabulary of {vocab_size} "
            "(config.json vocab_size)"
        )
