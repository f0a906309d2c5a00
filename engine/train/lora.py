"""LoRA on the engine's fused projections, saved as a PEFT adapter with Hugging Face module names.

The engine fuses q/k/v into one ``qkv`` Linear (rows [q | k | v]) and gate/up into ``gate_up``
(rows [gate | up]). A PEFT adapter has one (A, B) pair per Hugging Face projection, so
:class:`LoRALinear` keeps one pair per row slice: the update of ``q_proj`` only touches the q rows of
``qkv``. The output is ``base(x) + concat_s(scale * B_s @ A_s @ dropout_s(x))``, exactly PEFT's
``lora.Linear`` applied to each projection (each with its own dropout mask).

Saved tensors: ``{prefix}layers.N.self_attn.q_proj.lora_A.weight`` [r, in] and ``...lora_B.weight``
[out, r], float32, with ``prefix`` = ``base_model.model.model.`` for a ``*ForCausalLM`` checkpoint or
``base_model.model.`` for a bare ``*Model`` (LLM2Vec's layout), so that
``peft.PeftModel.from_pretrained`` on that transformers class finds every key.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from converters.safety import follow_umask

from ..model import EncoderModel
from .config import LORA_TARGETS, TrainError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LLM2VEC_CONFIG = "llm2vec_config.json"
PREFIXES = {"causal_lm": "base_model.model.model.", "bare": "base_model.model."}
# Hugging Face projection -> (its block, the engine Linear it lives in, its slot among that Linear's row slices).
HF_PROJECTIONS = {
    "q_proj": ("self_attn", "qkv", 0),
    "k_proj": ("self_attn", "qkv", 1),
    "v_proj": ("self_attn", "qkv", 2),
    "o_proj": ("self_attn", "o", 0),
    "gate_proj": ("mlp", "gate_up", 0),
    "up_proj": ("mlp", "gate_up", 1),
    "down_proj": ("mlp", "down", 0),
}


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` whose output rows are cut into named slices, some with a LoRA update.

    ``slices``: ``[(name, rows)]`` in row order, summing to the base's out_features; ``targets``: the
    names that get an adapter. A is initialised as PEFT does (Kaiming-uniform, a = sqrt(5)), B to zero.
    """

    def __init__(self, base: nn.Linear, slices: list[tuple[str, int]], targets: list[str], r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if sum(rows for _, rows in slices) != base.out_features:
            raise ValueError("row slices do not cover the base layer")
        self.base = base
        self.slices = slices
        self.r, self.scale = r, alpha / r
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.dropout = nn.ModuleDict()
        device = base.weight.device
        for name, rows in slices:
            if name not in targets:
                continue
            a = torch.empty(r, base.in_features, device=device, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(rows, r, device=device, dtype=torch.float32))
            self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        pieces = []
        for name, rows in self.slices:
            if name in self.lora_A:
                h = self.dropout[name](x)
                pieces.append(F.linear(F.linear(h, self.lora_A[name].to(h.dtype)), self.lora_B[name].to(h.dtype)) * self.scale)
            else:
                pieces.append(y.new_zeros(*y.shape[:-1], rows))
        delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return y + delta.to(y.dtype)


def apply_lora(model: EncoderModel, targets: list[str], r: int, alpha: float, dropout: float) -> list[nn.Parameter]:
    """Freeze ``model`` and wrap its projections with :class:`LoRALinear`; returns the trainable params."""
    cfg = model.cfg
    model.requires_grad_(False)
    slices = {
        "qkv": [("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("v_proj", cfg.kv_size)],
        "o": [("o_proj", cfg.hidden_size)],
        "gate_up": [("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)],
        "down": [("down_proj", cfg.hidden_size)],
    }
    for layer in model.layers:
        for attr, parts in slices.items():
            names = [n for n, _ in parts]
            if any(n in targets for n in names):
                setattr(layer, attr, LoRALinear(getattr(layer, attr), parts, targets, r, alpha, dropout))
    return [p for p in model.parameters() if p.requires_grad]


def lora_parameters(model: EncoderModel, prefix: str) -> dict[str, nn.Parameter]:
    """PEFT key -> parameter, for every LoRA pair in ``model`` (in layer and projection order)."""
    out = {}
    for i, layer in enumerate(model.layers):
        for proj, (block, attr, _) in HF_PROJECTIONS.items():
            module = getattr(layer, attr)
            if isinstance(module, LoRALinear) and proj in module.lora_A:
                base = f"{prefix}layers.{i}.{block}.{proj}"
                out[f"{base}.lora_A.weight"] = module.lora_A[proj]
                out[f"{base}.lora_B.weight"] = module.lora_B[proj]
    return out


def save_adapter(
    model: EncoderModel,
    out_dir: str | Path,
    *,
    r: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    layout: str,
    base_model: str,
    base_model_class: str | None = None,
    llm2vec_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` (by peft's own ``LoraConfig``) and ``adapter_model.safetensors``,
    and ``llm2vec_config.json`` when ``llm2vec_config`` is given.

    ``base_model_class`` (a transformers class name) is recorded as peft's ``auto_mapping``, as
    ``PeftModel.save_pretrained`` records it, so that a converter can tell the family the adapter
    was made for. Each file is written beside its final name and renamed into place, so a reader
    never sees half a file.
    """
    from peft import LoraConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().float().cpu().contiguous() for k, p in lora_parameters(model, PREFIXES[layout]).items()}
    alpha_value: float | int = int(alpha) if float(alpha).is_integer() else alpha
    config = LoraConfig(
        r=r,
        lora_alpha=alpha_value,
        lora_dropout=dropout,
        target_modules=[t for t in LORA_TARGETS if t in targets],
        bias="none",
        task_type=None,
        base_model_name_or_path=str(base_model),
    )
    tmp = out_dir / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    follow_umask(tmp)
    os.replace(tmp, out_dir / ADAPTER_WEIGHTS)
    auto_mapping = None
    if base_model_class is not None:
        import transformers

        auto_mapping = {"base_model_class": base_model_class,
                        "parent_library": getattr(transformers, base_model_class).__module__}
    staging = out_dir / ".adapter_config.tmp"
    staging.mkdir(exist_ok=True)
    config.save_pretrained(str(staging), auto_mapping_dict=auto_mapping)
    os.replace(staging / ADAPTER_CONFIG, out_dir / ADAPTER_CONFIG)
    staging.rmdir()
    if llm2vec_config is not None:
        tmp = out_dir / f".{LLM2VEC_CONFIG}.tmp"
        tmp.write_text(json.dumps(llm2vec_config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out_dir / LLM2VEC_CONFIG)
    return out_dir


def load_adapter_weights(model: EncoderModel, adapter_dir: str | Path, layout: str) -> None:
    """Copy a saved adapter's A/B into ``model``'s LoRA parameters (resuming); every key must match."""
    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    params = lora_parameters(model, PREFIXES[layout])
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(params):
                missing, extra = sorted(set(params) - keys), sorted(keys - set(params))
                raise TrainError(f"{file}: does not match this run's LoRA (missing {missing[:2]}, unexpected {extra[:2]})")
            with torch.no_grad():
                for key, param in params.items():
                    t = f.get_tensor(key)
                    if t.shape != param.shape:
                        raise TrainError(f"{file}: {key} has shape {list(t.shape)}, this run's is {list(param.shape)}")
                    param.copy_(t)
    except TrainError:
        raise
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise TrainError(f"{file}: cannot read the checkpoint's adapter ({exc})") from None
