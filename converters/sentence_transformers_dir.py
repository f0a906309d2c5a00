"""Reading a sentence-transformers directory: where its transformer is, and the input and pooling
defaults its modules describe.

A directory is one when it holds ``modules.json``. The layouts every sentence-transformers version
since 2.0 writes are read (checked against the 6.2 sources and the 2.x/3.x savers):

- ``modules.json``: a list of ``{"idx", "name", "path", "type"}``. ``type`` is the module's Python
  module path up to 5.x (``sentence_transformers.models.Transformer``) and its class path from 6.0
  (``sentence_transformers.base.modules.transformer.Transformer``); ``path`` is ``""`` for a
  transformer saved at the root (every version since 2.0) or a subfolder such as ``0_Transformer``.
- the transformer's folder: ``config.json``, the weights and the tokenizer, and
  ``sentence_bert_config.json``: ``max_seq_length`` and ``do_lower_case`` (up to 5.x);
  ``transformer_task``, ``modality_config``, ``module_output_name`` and the tokenizer's own
  ``model_max_length`` in ``tokenizer_config.json`` (6.x); ``tokenizer_args``/``model_args``/
  ``config_args`` or their 6.x names ``processor_kwargs``/``model_kwargs``/``config_kwargs``.
- the Pooling folder's ``config.json``: ``pooling_mode_*`` booleans (up to 5.x) or a ``pooling_mode``
  string (6.x), and ``include_prompt`` (True when absent, sentence-transformers' default).
- a Normalize module: an empty folder (up to 5.x) or one whose ``config.json`` names the normalised
  feature (6.x).
- ``config_sentence_transformers.json`` (since 2.0): ``prompts``, ``default_prompt_name``,
  ``model_type`` (6.x).

The maximum length follows sentence-transformers' rule: ``model_max_length`` among the tokenizer
arguments, else ``max_seq_length``, else the tokenizer's ``model_max_length`` capped at the model's
``max_position_embeddings``. Everything the engine cannot reproduce (other modules, pooling modes,
lower-casing, chat-formatted inputs, extra config arguments) is refused by name, never ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sources import ConversionError, read_json

MODULES_FILE = "modules.json"
MODEL_CONFIG = "config_sentence_transformers.json"
TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                       "sentence_camembert_config.json", "sentence_albert_config.json",
                       "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
# sentence-transformers pooling mode -> engine pooling. ``cls`` is the first token (BOS for a decoder).
POOLING_MODES = {"mean": "mean", "weightedmean": "weighted_mean", "lasttoken": "last_token", "cls": "bos_token"}
# Modes sentence-transformers has that the engine does not compute.
UNSERVED_POOLING = ("max", "mean_sqrt_len_tokens")
# Up to 5.x: one boolean per mode, in the order sentence-transformers concatenates them.
_LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Loading options of the hub (and dtype / attention implementation choices) that do not change results.
_HARMLESS_ARGS = {"trust_remote_code", "revision", "subfolder", "cache_dir", "token", "local_files_only",
                  "torch_dtype", "dtype", "attn_implementation", "device_map", "low_cpu_mem_usage", "use_fast",
                  "padding_side", "model_max_length"}
# Beyond this a tokenizer's model_max_length is transformers' "no limit" placeholder (int(1e30)).
_UNBOUNDED = 1 << 40


@dataclass(frozen=True)
class SentenceTransformersDir:
    """What a sentence-transformers directory says, in the engine's terms."""

    root: Path
    transformer: Path  # the folder with config.json, the weights and the tokenizer
    pooling: str  # an engine pooling name
    include_prompt: bool
    normalize: bool
    max_length: int | None  # None: nothing in the directory bounds it
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    files: tuple[Path, ...] = ()  # the sentence-transformers files read, for the provenance record

    def defaults(self) -> dict[str, Any]:
        """The engine-config defaults this directory sets."""
        out: dict[str, Any] = {
            "pooling": self.pooling, "include_prompt": self.include_prompt, "normalize": self.normalize,
            "prompts": dict(self.prompts), "default_prompt_name": self.default_prompt_name,
        }
        if self.max_length is not None:
            out["max_length"] = self.max_length
        return out


def is_sentence_transformers_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / MODULES_FILE).is_file()


def read_sentence_transformers_dir(path: str | Path) -> SentenceTransformersDir:
    """Read and check the directory ``path`` (which holds ``modules.json``); ConversionError naming the
    file and the field for anything the engine cannot reproduce."""
    root = Path(path).expanduser().resolve()
    modules_file = root / MODULES_FILE
    modules = read_json(modules_file)
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise ConversionError(f"{modules_file}: expected a non-empty list of module entries")
    try:
        modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    except (TypeError, ValueError):
        raise ConversionError(f"{modules_file}: module 'idx' values must be integers") from None
    kinds = [_module_kind(modules_file, m) for m in modules]
    folders = [_module_folder(root, modules_file, m) for m in modules]
    if kinds[0] != "Transformer":
        raise ConversionError(f"{modules_file}: the first module is {kinds[0]}; the engine needs a Transformer first")
    if kinds[1:2] != ["Pooling"]:
        what = kinds[1] if len(kinds) > 1 else "nothing"
        raise ConversionError(f"{modules_file}: the Transformer is followed by {what}; the engine needs a Pooling "
                              "module (token embeddings alone are not a sentence embedding)")
    rest = kinds[2:]
    for kind in rest:
        if kind != "Normalize":
            raise ConversionError(f"{modules_file}: module {kind} is not supported (the engine serves Transformer, "
                                  "Pooling and an optional final Normalize)")
    if len(rest) > 1:
        raise ConversionError(f"{modules_file}: {len(rest)} Normalize modules; expected at most one")
    files = [modules_file]
    transformer = folders[0]
    max_length, transformer_files = _transformer_settings(transformer)
    files += transformer_files
    pooling, include_prompt, pooling_file = _pooling_settings(folders[1])
    files.append(pooling_file)
    normalize = bool(rest)
    if normalize:
        normalize_file = _check_normalize(folders[2])
        if normalize_file is not None:
            files.append(normalize_file)
    prompts, default_prompt_name, model_file = _model_settings(root)
    if model_file is not None:
        files.append(model_file)
    return SentenceTransformersDir(root, transformer, pooling, include_prompt, normalize, max_length, prompts,
                                   default_prompt_name, tuple(files))


def _module_kind(modules_file: Path, module: dict[str, Any]) -> str:
    """``Transformer``, ``Pooling``, ``Normalize``, or another sentence-transformers module name
    (refused later); a type outside the package is custom code, refused here."""
    kind = module.get("type")
    if not isinstance(kind, str) or not kind:
        raise ConversionError(f"{modules_file}: a module entry has no 'type'")
    if not kind.startswith("sentence_transformers."):
        raise ConversionError(f"{modules_file}: module type {kind!r} is custom code, which the engine does not run")
    return kind.rsplit(".", 1)[-1]


def _module_folder(root: Path, modules_file: Path, module: dict[str, Any]) -> Path:
    rel = module.get("path", "")
    if not isinstance(rel, str) or Path(rel).is_absolute():
        raise ConversionError(f"{modules_file}: module path {rel!r} must be a relative folder name")
    folder = (root / rel).resolve()
    if folder != root and root not in folder.parents:
        raise ConversionError(f"{modules_file}: module path {rel!r} leaves the directory")
    if not folder.is_dir():
        raise ConversionError(f"{folder}: missing (listed in {MODULES_FILE})")
    return folder


def _transformer_settings(folder: Path) -> tuple[int | None, list[Path]]:
    """(max length by sentence-transformers' rule, files read); refuses what the engine cannot do."""
    if (folder / "adapter_config.json").is_file():
        raise ConversionError(f"{folder}: the transformer is a PEFT adapter; convert its base model with "
                              "--lora pointing at the adapter")
    config_file = next((folder / name for name in TRANSFORMER_CONFIGS if (folder / name).is_file()), None)
    settings: dict[str, Any] = {}
    files = []
    if config_file is not None:
        settings = read_json(config_file)
        if not isinstance(settings, dict):
            raise ConversionError(f"{config_file}: expected a JSON object")
        files.append(config_file)
    where = config_file or folder

    task = settings.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise ConversionError(f"{where}: transformer_task {task!r} is not supported (only feature-extraction)")
    if settings.get("do_lower_case"):
        raise ConversionError(f"{where}: do_lower_case=true is not supported (the engine does not lower-case inputs)")
    modality = settings.get("modality_config")
    if modality is not None and (not isinstance(modality, dict) or set(modality) != {"text"}):
        names = sorted(modality) if isinstance(modality, dict) else modality
        raise ConversionError(f"{where}: modality_config {names!r} is not supported (only plain text)")
    output = settings.get("module_output_name", "token_embeddings")
    if output != "token_embeddings":
        raise ConversionError(f"{where}: module_output_name {output!r} is not supported (only token_embeddings)")
    if settings.get("processing_kwargs"):
        raise ConversionError(f"{where}: processing_kwargs {sorted(settings['processing_kwargs'])} are not supported")
    for key in ("config_args", "config_kwargs"):
        changed = sorted(set(_dict_field(where, settings, key)) - _HARMLESS_ARGS)
        if changed:
            raise ConversionError(f"{where}: {key} {changed} would change the model config; not supported")
    tokenizer_args: dict[str, Any] = {}
    for key in ("tokenizer_args", "processor_kwargs"):
        args = _dict_field(where, settings, key)
        unknown = sorted(set(args) - _HARMLESS_ARGS)
        if unknown:
            raise ConversionError(f"{where}: {key} {unknown} are not supported")
        tokenizer_args |= args

    max_length = _positive_int(where, "tokenizer model_max_length", tokenizer_args.get("model_max_length"))
    if max_length is None:
        max_length = _positive_int(where, "max_seq_length", settings.get("max_seq_length"))
    if max_length is None:
        tokenizer_config = folder / "tokenizer_config.json"
        model_config = folder / "config.json"
        limits = []
        if tokenizer_config.is_file():
            data = read_json(tokenizer_config)
            value = data.get("model_max_length") if isinstance(data, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < _UNBOUNDED:
                limits.append(int(value))
        if model_config.is_file():
            data = read_json(model_config)
            value = data.get("max_position_embeddings") if isinstance(data, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                limits.append(value)
        max_length = min(limits) if limits else None
    return max_length, files


def _pooling_settings(folder: Path) -> tuple[str, bool, Path]:
    """(engine pooling, include_prompt, the config file)."""
    config_file = folder / "config.json"
    config = read_json(config_file, what="a Pooling module needs its config.json")
    if not isinstance(config, dict):
        raise ConversionError(f"{config_file}: expected a JSON object")
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else mode
        if not isinstance(modes, list) or not modes or not all(isinstance(m, str) for m in modes):
            raise ConversionError(f"{config_file}: pooling_mode {mode!r} is not a mode name or a list of them")
    else:
        modes = [name for key, name in _LEGACY_POOLING_FLAGS.items() if config.get(key)] or ["mean"]
    if len(modes) > 1:
        raise ConversionError(f"{config_file}: pooling modes {modes} are concatenated; the engine pools one way only")
    mode = modes[0]
    if mode in UNSERVED_POOLING:
        raise ConversionError(f"{config_file}: pooling mode {mode!r} is not supported; supported: "
                              f"{', '.join(POOLING_MODES)}")
    if mode not in POOLING_MODES:
        raise ConversionError(f"{config_file}: unknown pooling mode {mode!r}")
    include_prompt = config.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise ConversionError(f"{config_file}: include_prompt: expected true or false, got {include_prompt!r}")
    if not include_prompt and mode in ("weightedmean", "cls"):
        # sentence-transformers keeps each token's position weight (weightedmean) or takes the first
        # token after the prompt (cls); the engine's weights restart at the text and bos_token is the
        # sequence's first token.
        raise ConversionError(f"{config_file}: pooling mode {mode!r} with include_prompt=false is not supported")
    return POOLING_MODES[mode], include_prompt, config_file


def _check_normalize(folder: Path) -> Path | None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise ConversionError(f"{config_file}: expected a JSON object")
    for key in ("module_input_name", "module_output_name"):
        name = config.get(key, "sentence_embedding")
        if name != "sentence_embedding":
            raise ConversionError(f"{config_file}: Normalize of {name!r} is not supported (only sentence_embedding)")
    return config_file


def _model_settings(root: Path) -> tuple[dict[str, str], str | None, Path | None]:
    """(prompts, default_prompt_name, the file) from ``config_sentence_transformers.json``, if any."""
    file = root / MODEL_CONFIG
    if not file.is_file():
        return {}, None, None
    config = read_json(file)
    if not isinstance(config, dict):
        raise ConversionError(f"{file}: expected a JSON object")
    model_type = config.get("model_type", "SentenceTransformer")
    if model_type != "SentenceTransformer":
        raise ConversionError(f"{file}: model_type {model_type!r} is not supported (only SentenceTransformer)")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ConversionError(f"{file}: prompts: expected an object of name -> prompt strings")
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ConversionError(f"{file}: default_prompt_name {default!r} is not one of the prompts")
    return dict(prompts), default, file


def _dict_field(where: Path, settings: dict[str, Any], key: str) -> dict[str, Any]:
    value = settings.get(key) or {}
    if not isinstance(value, dict):
        raise ConversionError(f"{where}: {key}: expected a JSON object, got {value!r}")
    return value


def _positive_int(where: Path, name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConversionError(f"{where}: {name} {value!r} is not a positive integer")
    return value
