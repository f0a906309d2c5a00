"""Convert a local Hugging Face checkpoint or sentence-transformers directory (+ PEFT LoRA adapters)
into the engine format.

    convert(SRC, OUT, loras=[ADAPTER_DIR, ...], dtype=..., pooling=..., ...)

(the command line is ``python -m converters.hf2engine``, see :mod:`converters.hf2engine`).

Defaults, lowest to highest priority: the engine's (mean pooling, 512 tokens, bidirectional for a
Hugging Face checkpoint, the LLM2Vec rule of pooling the text's tokens only); a sentence-transformers
directory's modules (pooling, include_prompt, Normalize, max length, prompts; causal attention);
``llm2vec_config.json`` of SRC then of each adapter; a config's own ``is_causal`` or
``use_bidirectional_attention``; the flags.

Streaming: every input is validated from its safetensors header first (names, shapes, byte ranges,
adapter fit), then each layer's tensors are read memory-mapped, fused (q/k/v, gate/up), merged with
the adapters in float32, cast once to the output dtype, written as their own shard and freed; peak
memory stays near one layer. The output is assembled in a temporary directory beside OUT and renamed
into place only when complete; an existing OUT is replaced only with ``force`` and only then, and
never when it is, or contains, SRC or an adapter (see ``converters.safety``). Every tensor read is
checked for NaN and Inf, and the tokenizer against the vocabulary, before anything is installed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from engine.choices import POOLING_MODES
from engine.config import ATTENTION_KINDS, ConfigError, ModelConfig
from engine.format import (
    DTYPES,
    ENGINE_CONFIG,
    WEIGHTS_INDEX,
    EngineConfig,
    FormatError,
    sha256_file,
    shard_metadata,
)
from engine.shell import deferred_interrupts

from .lora import LLM2VEC_CONFIG, Adapter, merge, pooling_defaults
from .safety import (
    MARKER,
    disk_full_line,
    follow_umask,
    is_disk_full,
    make_temp_dir,
    overlapping_input,
    remove_owned,
    resolve_path,
    sweep,
    unused_name,
    write_marker,
)
from .sentence_transformers_dir import is_sentence_transformers_dir, read_sentence_transformers_dir
from .sources import (
    Checkpoint,
    ConversionError,
    TensorInfo,
    all_finite,
    check_layer_count,
    check_tokenizer,
    file_hashes,
    read_json,
)

__all__ = ["ConversionError", "convert"]
DEFAULT_POOLING = "mean"
DEFAULT_MAX_LENGTH = 512
_FLOAT_TAGS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Buffers some older checkpoints carry; recomputed by the engine, safe to skip.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def layer_fusions(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Engine tensor name (inside ``layers.N``) -> the Hugging Face tensors fused into it, in row order.

    Gemma-2 has four norms per layer and names them differently: its ``post_attention_layernorm`` is
    the norm on the attention output (``post_attn_norm``), where the other families use that name for
    the MLP's input norm; the MLP's input norm is its ``pre_feedforward_layernorm``.
    """
    out: dict[str, tuple[str, ...]] = {
        "attn_norm": ("input_layernorm.weight",),
        "mlp_norm": ("pre_feedforward_layernorm.weight",) if cfg.post_norms else ("post_attention_layernorm.weight",),
        "qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "o.weight": ("self_attn.o_proj.weight",),
        "gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        "down.weight": ("mlp.down_proj.weight",),
    }
    if cfg.qkv_bias:
        out["qkv.bias"] = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
    if cfg.post_norms:
        out["post_attn_norm"] = ("post_attention_layernorm.weight",)
        out["post_mlp_norm"] = ("post_feedforward_layernorm.weight",)
    if cfg.qk_norm:
        out["q_norm"] = ("self_attn.q_norm.weight",)
        out["k_norm"] = ("self_attn.k_norm.weight",)
    return out


def _layer_source_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor of one layer (name inside ``layers.N``) -> its shape from the config."""
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (cfg.q_size, H),
        "self_attn.k_proj.weight": (cfg.kv_size, H),
        "self_attn.v_proj.weight": (cfg.kv_size, H),
        "self_attn.o_proj.weight": (H, cfg.q_size),
        "mlp.gate_proj.weight": (I, H),
        "mlp.up_proj.weight": (I, H),
        "mlp.down_proj.weight": (H, I),
    }
    if cfg.qkv_bias:
        shapes |= {"self_attn.q_proj.bias": (cfg.q_size,), "self_attn.k_proj.bias": (cfg.kv_size,),
                   "self_attn.v_proj.bias": (cfg.kv_size,)}
    if cfg.post_norms:
        shapes |= {"pre_feedforward_layernorm.weight": (H,), "post_feedforward_layernorm.weight": (H,)}
    if cfg.qk_norm:
        shapes |= {"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)}
    return shapes


@dataclass
class _Plan:
    """The validated mapping from source tensors to engine shards."""

    cfg: ModelConfig
    prefix: str  # "model." for *ForCausalLM, "" for bare *Model
    shapes: dict[str, tuple[int, ...]]  # every source tensor we read -> its expected shape
    keep_lm_head: bool

    def layer_sources(self, i: int) -> dict[str, list[str]]:
        """Engine name -> source names for layer ``i``."""
        return {
            f"layers.{i}.{engine_name}": [f"{self.prefix}layers.{i}.{p}" for p in parts]
            for engine_name, parts in layer_fusions(self.cfg).items()
        }


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    loras: Sequence[str | os.PathLike] = (),
    dtype: str | torch.dtype | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    force: bool = False,
    quiet: bool = False,
    keep_lm_head: bool = False,
    *,
    attention: str | None = None,
    append_eos: bool | None = None,
    normalize: bool | None = None,
    include_prompt: bool | None = None,
) -> Path:
    """Convert the Hugging Face checkpoint or sentence-transformers directory ``src`` (merging
    ``loras`` in order) into ``out``.

    ``dtype``: output dtype (default: the source's). The stored input defaults ``pooling``,
    ``max_length``, ``include_prompt``, ``append_eos``, ``normalize`` and ``attention``
    (``bidirectional`` or ``causal``) override what the sources say (see the module docstring);
    None keeps it. Returns the resolved ``out``. Raises :class:`ConversionError` with a one-line message.
    """
    dtype_name = _dtype_name(dtype)
    if pooling is not None and pooling not in POOLING_MODES:
        raise ConversionError(f"pooling {pooling!r} is not one of {', '.join(POOLING_MODES)}")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ConversionError(f"max_length {max_length!r} is not a positive integer")
    if attention is not None and attention not in ATTENTION_KINDS:
        raise ConversionError(f"attention {attention!r} is not one of {', '.join(ATTENTION_KINDS)}")
    for name, value in (("append_eos", append_eos), ("normalize", normalize), ("include_prompt", include_prompt)):
        if value is not None and not isinstance(value, bool):
            raise ConversionError(f"{name} {value!r} is not true or false")

    out_path = resolve_path(out)
    clash = overlapping_input(out_path, [src, *loras])
    if clash is not None:
        raise ConversionError(f"{out_path}: OUT would replace the input {clash} (OUT is, or contains, it)")
    sweep(out_path.parent, [out_path.name], kinds=("tmp", "old"))  # what a killed conversion left
    _check_out(out_path, force)
    st_dir = read_sentence_transformers_dir(src) if is_sentence_transformers_dir(src) else None
    ckpt = Checkpoint.open(st_dir.transformer if st_dir is not None else src)
    try:
        # A sentence-transformers directory runs its decoder as transformers does: causal unless the
        # config says otherwise. LLM2Vec checkpoints are bidirectional.
        cfg = ModelConfig.from_hf(ckpt.config, attention=attention,
                                  default_attention="causal" if st_dir is not None else "bidirectional")
    except ConfigError as exc:
        raise ConversionError(f"{ckpt.path / 'config.json'}: {exc}") from None
    check_layer_count(ckpt, cfg.num_layers)
    plan = _plan(ckpt, cfg, keep_lm_head)
    check_tokenizer(ckpt, cfg.vocab_size)
    adapters = [Adapter.open(p) for p in loras]
    proj_shapes = {
        "q_proj": (cfg.q_size, cfg.hidden_size),
        "k_proj": (cfg.kv_size, cfg.hidden_size),
        "v_proj": (cfg.kv_size, cfg.hidden_size),
        "o_proj": (cfg.hidden_size, cfg.q_size),
        "gate_proj": (cfg.intermediate_size, cfg.hidden_size),
        "up_proj": (cfg.intermediate_size, cfg.hidden_size),
        "down_proj": (cfg.hidden_size, cfg.intermediate_size),
    }
    for adapter in adapters:
        adapter.check_against(cfg.num_layers, proj_shapes)
        adapter.check_family(cfg.family, ckpt.path)
    if dtype_name is None:
        dtype_name = _source_dtype(ckpt, plan)
    settings: dict[str, Any] = {"pooling": DEFAULT_POOLING, "include_prompt": False, "append_eos": False,
                                "normalize": False, "prompts": {}, "default_prompt_name": None}
    if st_dir is not None:
        settings |= st_dir.defaults()
    settings |= _pooling_defaults(ckpt, adapters)
    flags = {"pooling": pooling, "max_length": max_length, "include_prompt": include_prompt,
             "append_eos": append_eos, "normalize": normalize}
    settings |= {k: v for k, v in flags.items() if v is not None}
    settings["max_length"] = _max_length(settings.get("max_length"), cfg, ckpt.path)
    if settings["append_eos"]:
        _check_has_eos(ckpt)

    created = _make_parents(out_path.parent)
    tmp = None
    try:
        tmp = make_temp_dir(out_path.parent, out_path.name)
        sources: dict[str, Any] = {
            "checkpoint": {"path": str(ckpt.path), "files": file_hashes(ckpt.input_files(), ckpt.path)},
            "adapters": [a.source_record() for a in adapters],
        }
        if st_dir is not None:
            sources["sentence_transformers"] = {"path": str(st_dir.root), "files": file_hashes(st_dir.files, st_dir.root)}
        has_lm_head = _write_weights(tmp, ckpt, plan, adapters, DTYPES[dtype_name], quiet)
        for file in ckpt.tokenizer_files:
            shutil.copyfile(file, tmp / file.name)
        try:
            engine_config = EngineConfig(model=cfg, dtype=dtype_name, has_lm_head=has_lm_head, sources=sources,
                                         **settings)
        except FormatError as exc:
            raise ConversionError(str(exc)) from None
        (tmp / ENGINE_CONFIG).write_text(engine_config.to_json())
        _install(tmp, out_path, force)
        tmp = None
    except BaseException as exc:
        with deferred_interrupts():  # a second Ctrl-C must not stop the clean-up halfway
            if tmp is not None:
                remove_owned(tmp)
            for d in reversed(created):
                try:
                    d.rmdir()
                except OSError:
                    break
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise ConversionError(disk_full_line(out_path, _output_bytes(plan, DTYPES[dtype_name]))) from None
        raise
    return out_path


def _output_bytes(plan: _Plan, dtype: torch.dtype) -> int:
    """What the weights of OUT take, for the full-disk message."""
    return sum(math.prod(shape) for shape in plan.shapes.values()) * dtype.itemsize


def _max_length(value: int | None, cfg: ModelConfig, where: Path) -> int:
    """The stored max_length: ``value``, refused beyond the model's trained context (the engine would
    refuse to load it); the built-in default is capped there instead."""
    limit = cfg.max_position_embeddings
    if value is None:
        return DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit)
    if limit is not None and value > limit:
        raise ConversionError(f"{where}: max_length {value} exceeds the model's max_position_embeddings={limit}; "
                              "pass a smaller --max-length")
    return value


def _check_has_eos(ckpt: Checkpoint) -> None:
    """``append_eos`` needs the tokenizer to name an EOS token."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = ckpt.path / name
        data = read_json(file) if file.is_file() else None
        if isinstance(data, dict) and data.get("eos_token"):
            return
    raise ConversionError(f"{ckpt.path}: --append-eos: the tokenizer names no eos_token (tokenizer_config.json)")


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    for name, value in DTYPES.items():
        if dtype == name or dtype == value:
            return name
    raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise ConversionError(f"{out}: already exists; pass --force to replace it")
        if out.is_symlink() or not out.is_dir():
            raise ConversionError(f"{out}: exists and is not a directory; remove it yourself")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConversionError(f"{parent}: not a directory")
            break


def _plan(ckpt: Checkpoint, cfg: ModelConfig, keep_lm_head: bool) -> _Plan:
    """Check every tensor the config calls for is present with its shape, and nothing unexpected is."""
    where = ckpt.path
    if "model.embed_tokens.weight" in ckpt.tensors:
        prefix = "model."
    elif "embed_tokens.weight" in ckpt.tensors:
        prefix = ""
    else:
        raise ConversionError(f"{where}: missing tensor 'model.embed_tokens.weight' (or 'embed_tokens.weight')")
    H, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}embed_tokens.weight": (V, H), f"{prefix}norm.weight": (H,)}
    per_layer = _layer_source_shapes(cfg)
    for i in range(cfg.num_layers):
        shapes |= {f"{prefix}layers.{i}.{name}": shape for name, shape in per_layer.items()}
    keep = keep_lm_head and not cfg.tie_word_embeddings
    if keep:
        if "lm_head.weight" not in ckpt.tensors:
            raise ConversionError(
                f"{where}: --keep-lm-head: missing tensor 'lm_head.weight' (a bare *Model checkpoint has no LM head)"
            )
        shapes["lm_head.weight"] = (V, H)
    for name, shape in shapes.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise ConversionError(f"{where}: missing tensor {name!r}")
        if info.shape != shape:
            raise ConversionError(
                f"{info.file}: shape mismatch for {name!r}: {list(info.shape)} in the checkpoint, "
                f"{list(shape)} from config.json"
            )
        if info.dtype not in _FLOAT_TAGS and info.dtype != "F64":
            raise ConversionError(f"{info.file}: tensor {name!r} has non-float dtype {info.dtype}")
    layer_prefix = f"{prefix}layers."
    for name in sorted(ckpt.tensors):
        if name in shapes or name == "lm_head.weight" or name.endswith(_IGNORED_SUFFIXES):
            continue
        if name.startswith(layer_prefix):
            layer = name[len(layer_prefix) :].split(".", 1)[0]
            if layer.isdigit() and int(layer) >= cfg.num_layers:
                raise ConversionError(
                    f"{ckpt.tensors[name].file}: unexpected tensor {name!r}: config.json has "
                    f"num_hidden_layers={cfg.num_layers}"
                )
            raise ConversionError(
                f"{ckpt.tensors[name].file}: unexpected layer tensor {name!r}; this engine's layers have no such "
                "parameter"
            )
        raise ConversionError(f"{ckpt.tensors[name].file}: unexpected tensor {name!r}")
    return _Plan(cfg, prefix, shapes, keep)


def _source_dtype(ckpt: Checkpoint, plan: _Plan) -> str:
    for key in ("dtype", "torch_dtype"):
        name = ckpt.config.get(key)
        if isinstance(name, str) and name in DTYPES:
            return name
    tag = ckpt.tensors[f"{plan.prefix}embed_tokens.weight"].dtype
    if tag not in _FLOAT_TAGS:
        raise ConversionError(f"{ckpt.path}: weights are {tag}; choose an output dtype with --dtype")
    return _FLOAT_TAGS[tag]


def _pooling_defaults(ckpt: Checkpoint, adapters: list[Adapter]) -> dict[str, Any]:
    """LLM2Vec pooling defaults: the source's llm2vec_config.json, overridden by each adapter's in order."""
    out: dict[str, Any] = {}
    own = ckpt.path / LLM2VEC_CONFIG
    if own.is_file():
        data = read_json(own)
        if not isinstance(data, dict):
            raise ConversionError(f"{own}: not a JSON object")
        out |= pooling_defaults(data, own)
    for adapter in adapters:
        if adapter.llm2vec is not None:
            out |= pooling_defaults(adapter.llm2vec, adapter.path / LLM2VEC_CONFIG)
    return out


def _read(infos: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Read ``infos`` (name -> location), one shard handle at a time, closed before returning so that
    no mapping keeps earlier layers' pages resident."""
    by_file: dict[Path, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append(name)
    out = {}
    for file, names in sorted(by_file.items()):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        except Exception as exc:  # SafetensorError, OSError: a file damaged since its header was read
            raise ConversionError(f"{file}: truncated or corrupt ({exc})") from None
        for name in names:
            if not all_finite(out[name]):
                raise ConversionError(f"{file}: tensor {name!r} holds NaN or Inf values")
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype, name: str, info: TensorInfo, merged: bool = False) -> torch.Tensor:
    """``t`` in the output dtype; refused when that (or the merge) leaves the dtype's finite range
    (a bfloat16 weight of 1e5 is inf in float16). The source was already checked finite."""
    out = t.to(dtype)
    if (merged or out.dtype != t.dtype) and not all_finite(out):
        what = "with the adapters merged " if merged else ""
        raise ConversionError(
            f"{info.file}: tensor {name!r} {what}has values beyond the range of {str(dtype).removeprefix('torch.')}; "
            "convert with --dtype float32 or bfloat16"
        )
    return out


def _write_weights(
    tmp: Path, ckpt: Checkpoint, plan: _Plan, adapters: list[Adapter], dtype: torch.dtype, quiet: bool
) -> bool:
    """Write ``weights-NNNNN.safetensors`` (embeddings, one per layer, final norm + lm_head) and the index."""
    cfg, p = plan.cfg, plan.prefix
    n_shards = cfg.num_layers + 2
    weight_map: dict[str, str] = {}
    shard_sha256: dict[str, str] = {}
    metadata = shard_metadata(cfg)
    total = 0

    def write(k: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        file = f"weights-{k:05d}.safetensors"
        tensors = {name: t.contiguous() for name, t in tensors.items()}
        save_file(tensors, str(tmp / file), metadata=metadata)
        follow_umask(tmp / file)
        shard_sha256[file] = sha256_file(tmp / file)
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()

    bar = tqdm(total=n_shards, desc="hf2engine", unit="shard", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    try:
        src = _read({f"{p}embed_tokens.weight": ckpt.tensors[f"{p}embed_tokens.weight"]})
        name = f"{p}embed_tokens.weight"
        write(1, {"embed.weight": _cast(src.pop(name), dtype, name, ckpt.tensors[name])})
        bar.update()
        for i in range(cfg.num_layers):
            fusions = plan.layer_sources(i)
            src = _read({name: ckpt.tensors[name] for parts in fusions.values() for name in parts})
            deltas: dict[str, list] = {}
            for adapter in adapters:
                for proj, delta in adapter.load_layer(i).items():
                    deltas.setdefault(proj, []).append(delta)
            tensors = {}
            for engine_name, parts in fusions.items():
                pieces = []
                for name in parts:
                    t = src.pop(name)
                    proj = name.rsplit(".", 2)[-2]
                    merged = name.endswith(".weight") and proj in deltas
                    if merged:
                        t = merge(t, deltas.pop(proj))  # float32; cast once below
                    pieces.append(_cast(t, dtype, name, ckpt.tensors[name], merged))
                    del t
                tensors[engine_name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
                del pieces
            del deltas, src
            write(i + 2, tensors)
            del tensors
            bar.update()
        last = {f"{p}norm.weight": ckpt.tensors[f"{p}norm.weight"]}
        if plan.keep_lm_head:
            last["lm_head.weight"] = ckpt.tensors["lm_head.weight"]
        src = _read(last)
        tensors = {"norm": _cast(src.pop(f"{p}norm.weight"), dtype, f"{p}norm.weight", last[f"{p}norm.weight"])}
        if plan.keep_lm_head:
            tensors["lm_head.weight"] = _cast(src.pop("lm_head.weight"), dtype, "lm_head.weight", last["lm_head.weight"])
        write(n_shards, tensors)
        bar.update()
    finally:
        bar.close()
    index = {"metadata": {"total_size": total, "sha256": shard_sha256}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return plan.keep_lm_head


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and missing ancestors; the ones created, outermost first (removed on failure)."""
    missing = []
    for d in [parent, *parent.parents]:
        if d.exists():
            break
        missing.append(d)
    missing.reverse()
    for d in missing:
        d.mkdir()
    return missing


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` (``force``) is moved aside first and
    deleted only once the new one is in place.

    A signal arriving during the swap is held until it is over, and then the swap is undone first,
    so an interrupted conversion leaves the old ``out`` as it was. A SIGKILL at any point leaves
    marked directories that the next conversion to ``out`` sweeps (or moves back, see ``sweep``).
    """
    old, marked = None, False
    with deferred_interrupts() as interrupted:
        if out.exists() or out.is_symlink():
            if not force:  # appeared while we were converting
                raise ConversionError(f"{out}: already exists; pass --force to replace it")
            old = unused_name(out.parent, out.name, "old")
            try:  # the marker travels with the rename: the moved-aside directory is then ours to sweep
                write_marker(out, "old")
                marked = True
            except OSError:
                pass  # a read-only OUT: replaced all the same, only a SIGKILL leftover stays unswept
            try:
                os.rename(out, old)
            except BaseException:
                _unmark(out, marked)
                raise
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
                _unmark(out, marked)
            raise
        if interrupted():
            os.rename(out, tmp)
            if old is not None:
                os.rename(old, out)
                _unmark(out, marked)
            return  # the held signal is raised on leaving the block; the caller removes tmp
        _unmark(out, True)  # tmp's own marker
    if old is not None:
        remove_owned(old)


def _unmark(directory: Path, marked: bool) -> None:
    if marked:
        (directory / MARKER).unlink(missing_ok=True)
