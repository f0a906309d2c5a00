"""Training options: one dataclass, LLM2Vec's values as per-objective defaults, a JSON file on top.

Precedence, lowest first: the objective's defaults, ``--config FILE.json``, explicit command-line flags.
JSON keys are the field names below (the flags with ``_`` for ``-``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..choices import POOLING_MODES

OBJECTIVES = ("mntp", "simcse", "supervised")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MASK_TOKENS = ("blank", "eos", "mask")  # "_", the EOS token, or a new mask token (training-only row)
DTYPES = ("auto", "float32", "bfloat16")
ADAPTER_LAYOUTS = ("auto", "causal_lm", "bare")


class TrainError(ValueError):
    """A user-facing training failure; ``str(err)`` is the one line the CLI prints."""


class DataError(TrainError):
    """A data file that cannot be trained on, with the file (and line) named."""


@dataclass
class TrainConfig:
    objective: str
    model: str = ""  # Hugging Face checkpoint directory
    data: str = ""  # text file (mntp, simcse) or JSONL pairs (supervised)
    out: str = ""  # adapter directory to write
    lora: list[str] = field(default_factory=list)  # adapters merged into the base first (the MNTP one)
    eval_data: str | None = None  # held-out file, same format as data
    # Optimisation (Hugging Face Trainer's AdamW and linear schedule, as LLM2Vec uses them).
    steps: int = 1000
    batch_size: int = 32  # per process; the global batch is batch_size * processes
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_length: int = 512
    seed: int = 42
    gradient_checkpointing: bool = True
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    device: str = "auto"
    # LoRA (alpha defaults to 2 r, as LLM2Vec sets it).
    lora_r: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    adapter_layout: str = "auto"  # module names for *ForCausalLM ("causal_lm") or bare *Model ("bare")
    # MNTP
    mlm_probability: float = 0.2
    mask_token: str = "blank"
    all_mask: bool = False
    # Contrastive
    pooling: str = "mean"
    simcse_dropout: float = 0.3
    loss_scale: float = 20.0
    # Bookkeeping
    log_steps: int = 50
    save_steps: int = 200
    save_total_limit: int | None = None  # keep only the newest N checkpoint-STEP directories
    eval_steps: int = 100
    resume: bool = False
    force: bool = False
    quiet: bool = False

    @property
    def alpha(self) -> float:
        return 2.0 * self.lora_r if self.lora_alpha is None else float(self.lora_alpha)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def validate(self) -> None:
        """Raise :class:`TrainError` for the first invalid option."""
        if self.objective not in OBJECTIVES:
            raise TrainError(f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        for name in ("model", "data", "out"):
            value = getattr(self, name)
            if not value:
                raise TrainError(f"--{name.replace('_', '-')} is required")
            if not isinstance(value, str):
                raise TrainError(f"{name.replace('_', '-')} must be a path (a string), got {value!r}")
        if self.eval_data is not None and (not isinstance(self.eval_data, str) or not self.eval_data):
            raise TrainError(f"eval-data must be a path (a string), got {self.eval_data!r}")
        if not isinstance(self.device, str) or not self.device:
            raise TrainError(f"device must be a string such as cpu, cuda or cuda:1, got {self.device!r}")
        for name in ("gradient_checkpointing", "all_mask", "resume", "force", "quiet"):
            if not isinstance(getattr(self, name), bool):
                raise TrainError(f"{name.replace('_', '-')} must be true or false, got {getattr(self, name)!r}")
        positive_ints = ("steps", "batch_size", "grad_accum", "max_seq_length", "lora_r", "log_steps", "save_steps", "eval_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise TrainError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise TrainError(f"{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
        if self.save_total_limit is not None and (not _is_int(self.save_total_limit) or self.save_total_limit < 1):
            raise TrainError(f"save-total-limit must be a positive integer, got {self.save_total_limit!r}")
        if self.objective == "mntp" and self.max_seq_length < 2:
            raise TrainError("max-seq-length must be at least 2 for mntp: a token is predicted from the one before "
                             f"it, so {self.max_seq_length}-token sequences have nothing to predict")
        for name in ("lr", "loss_scale"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise TrainError(f"{name.replace('_', '-')} must be a positive number, got {value!r}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise TrainError(f"{name.replace('_', '-')} must be a non-negative number, got {value!r}")
        for name in ("lora_dropout", "simcse_dropout"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise TrainError(f"{name.replace('_', '-')} must be in [0, 1), got {value!r}")
        if not _is_number(self.mlm_probability) or not 0 < self.mlm_probability <= 1:
            raise TrainError(f"mlm-probability must be in (0, 1], got {self.mlm_probability!r}")
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha) or self.lora_alpha <= 0):
            raise TrainError(f"lora-alpha must be a positive number, got {self.lora_alpha!r}")
        targets = self.lora_targets
        if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
            raise TrainError(f"lora-targets must be a non-empty subset of {', '.join(LORA_TARGETS)}, got {targets!r}")
        if len(set(targets)) != len(targets):
            raise TrainError(f"lora-targets has duplicates: {targets!r}")
        choices = {"mask_token": MASK_TOKENS, "dtype": DTYPES, "adapter_layout": ADAPTER_LAYOUTS, "pooling": POOLING_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainError(f"{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.lora, list) or not all(isinstance(p, str) and p for p in self.lora):
            raise TrainError(f"lora must be a list of adapter directories, got {self.lora!r}")
        if self.objective == "mntp" and self.lora:
            raise TrainError("--lora is for simcse/supervised (the MNTP adapter to merge first); mntp starts from the base")
        if self.resume and self.force:
            raise TrainError("--resume and --force exclude each other")


# LLM2Vec's train configs (train_configs/{mntp,simcse,supervised}/*.json, Hugging Face Trainer defaults
# where they set nothing). Mistral's MNTP config uses all_mask with mlm_probability 0.8; the others,
# and this default, the 80/10/10 collator with 0.2.
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mntp": dict(steps=1000, batch_size=32, lr=5e-5, warmup_steps=0, max_seq_length=512, lora_r=16,
                 mlm_probability=0.2, mask_token="blank", all_mask=False),
    "simcse": dict(steps=1000, batch_size=128, lr=3e-5, warmup_steps=0, max_seq_length=128, lora_r=16,
                   simcse_dropout=0.3, loss_scale=20.0, pooling="mean"),
    "supervised": dict(steps=1000, batch_size=64, lr=2e-4, warmup_steps=300, max_seq_length=512, lora_r=16,
                       loss_scale=50.0, pooling="mean"),
}


def make_config(objective: str, file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """The options for ``objective``: its defaults, then ``file`` (JSON), then ``overrides``.

    ``overrides`` with the value None are ignored (flags not given). Raises :class:`TrainError`.
    """
    if objective not in OBJECTIVES:
        raise TrainError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    values: dict[str, Any] = dict(OBJECTIVE_DEFAULTS[objective])
    names = {f.name for f in fields(TrainConfig)} - {"objective"}
    if file is not None:
        data = read_config_file(file)
        if data.get("objective", objective) != objective:
            raise TrainError(f"{file}: objective {data['objective']!r} does not match the command {objective!r}")
        data.pop("objective", None)
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainError(f"{file}: unknown options {unknown}; known: {', '.join(sorted(names))}")
        values.update(data)
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TrainError(f"unknown options {unknown}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("lora"), str):
        values["lora"] = [values["lora"]]
    cfg = TrainConfig(objective=objective, **values)
    cfg.validate()
    return cfg


def read_config_file(file: str | Path) -> dict[str, Any]:
    path = Path(file)
    if not path.is_file():
        raise TrainError(f"{path}: no such config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TrainError(f"{path}: expected a JSON object of options")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
