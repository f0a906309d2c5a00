"""Shared builders for the converter tests: tiny checkpoints and adapters built once per session.

Builders cache by their arguments in a module-level dict, so test modules that import them share one
build (a session-scoped fixture imported into two modules would build twice).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from converters.tiny_models import LORA_TARGETS, save_lora_adapter, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
_CACHE: dict[Any, Path] = {}
_ROOT: list[Path] = []


def set_root(path: Path) -> None:
    if not _ROOT:
        _ROOT.append(path)


def _cached(key: Any, build) -> Path:
    if key not in _CACHE:
        out = _ROOT[0] / f"b{len(_CACHE):03d}"
        build(out)
        _CACHE[key] = out
    return _CACHE[key]


def _key(kwargs: dict[str, Any]) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in kwargs.items()))


def tiny(family: str, **kwargs: Any) -> Path:
    """A tiny random ``family`` checkpoint (sharded safetensors + tokenizer), cached by arguments."""
    return _cached(("tiny", family, _key(kwargs)), lambda out: save_tiny_checkpoint(out, family, **kwargs))


def adapter(model_dir: Path, **kwargs: Any) -> Path:
    """A PEFT LoRA adapter with random non-zero A/B for ``model_dir`` (see ``save_lora_adapter``)."""
    return _cached(("adapter", str(model_dir), _key(kwargs)), lambda out: save_lora_adapter(model_dir, out, **kwargs))


def peft_adapter(model_dir: Path, *, bare: bool = False, seed: int = 0, scale: float = 0.05, **lora_kwargs: Any) -> Path:
    """An adapter saved by peft with any ``LoraConfig`` options (rank_pattern, use_dora, ...).

    ``bare`` wraps ``AutoModel`` (keys ``base_model.model.layers...``, as LLM2Vec saves them) instead of
    ``AutoModelForCausalLM`` (``base_model.model.model.layers...``).
    """
    def build(out: Path) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModel if bare else AutoModelForCausalLM
        base = cls.from_pretrained(str(model_dir), dtype=torch.float32)
        options = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none")
        options.update(lora_kwargs)
        model = get_peft_model(base, LoraConfig(**options))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(scale * torch.randn(param.shape, generator=gen))
        model.save_pretrained(str(out), safe_serialization=True)

    return _cached(("peft", str(model_dir), bare, seed, scale, _key(lora_kwargs)), build)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def peft_merged_state(model_dir: Path, adapters: list[Path], bare: bool = False) -> dict[str, torch.Tensor]:
    """The independent reference: transformers loads the base, peft merges each adapter in order."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if bare else AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32)
    for path in adapters:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fuse_reference(state: dict[str, torch.Tensor], num_layers: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """Engine tensor names from a transformers state dict (written independently of the converter)."""
    p = "model." if "model.embed_tokens.weight" in state else ""
    out = {"embed.weight": state[f"{p}embed_tokens.weight"], "norm": state[f"{p}norm.weight"]}
    for i in range(num_layers):
        L = f"{p}layers.{i}."
        a, m = L + "self_attn.", L + "mlp."
        out[f"layers.{i}.attn_norm"] = state[L + "input_layernorm.weight"]
        out[f"layers.{i}.mlp_norm"] = state[L + "post_attention_layernorm.weight"]
        out[f"layers.{i}.qkv.weight"] = torch.cat([state[a + f"{x}_proj.weight"] for x in "qkv"])
        if qkv_bias:
            out[f"layers.{i}.qkv.bias"] = torch.cat([state[a + f"{x}_proj.bias"] for x in "qkv"])
        out[f"layers.{i}.o.weight"] = state[a + "o_proj.weight"]
        out[f"layers.{i}.gate_up.weight"] = torch.cat([state[m + "gate_proj.weight"], state[m + "up_proj.weight"]])
        out[f"layers.{i}.down.weight"] = state[m + "down_proj.weight"]
    return out


def assert_close_verbose(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6, rtol: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected), (sorted(set(actual) ^ set(expected)))
    for name in sorted(expected):
        a, e = actual[name].float(), expected[name].float()
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        err = (a - e).abs().max().item() if a.numel() else 0.0
        assert torch.allclose(a, e, atol=atol, rtol=rtol), f"{name}: max abs error {err:.3g}"


def write_big_checkpoint(out: Path, tokenizer_from: Path, *, layers: int, hidden: int, intermediate: int, vocab: int = 384) -> int:
    """A Llama-shaped fp32 checkpoint written straight with safetensors (fast: no model object),
    one shard per layer. Returns its weight bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    heads = hidden // 64
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "dtype": "float32",
        "tie_word_embeddings": False,
    }
    (out / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def shard(k: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{k:05d}-of-{layers + 2:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * 4

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * 0.05

    shard(1, {"model.embed_tokens.weight": rand(vocab, hidden)})
    for i in range(layers):
        L = f"model.layers.{i}."
        shard(i + 2, {
            L + "input_layernorm.weight": torch.ones(hidden),
            L + "post_attention_layernorm.weight": torch.ones(hidden),
            **{L + f"self_attn.{x}_proj.weight": rand(hidden, hidden) for x in "qkvo"},
            L + "mlp.gate_proj.weight": rand(intermediate, hidden),
            L + "mlp.up_proj.weight": rand(intermediate, hidden),
            L + "mlp.down_proj.weight": rand(hidden, intermediate),
        })
    shard(layers + 2, {"model.norm.weight": torch.ones(hidden), "lm_head.weight": rand(vocab, hidden)})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copyfile(tokenizer_from / "tokenizer.json", out / "tokenizer.json")
    return total


def run_cli(*args: str | os.PathLike, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m converters.hf2engine ARGS`` in a subprocess (text output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "converters.hf2engine", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env,
    )


def leftovers(parent: Path) -> list[str]:
    """Temporary or moved-aside directories the converter might have left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def engine_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an engine directory, read with safetensors alone (no engine code)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("weights-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def tree_snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def rewrite_without(shard: Path, drop: str) -> None:
    """Rewrite a safetensors shard without tensor ``drop`` (the index still lists it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        meta = f.metadata()
    save_file(tensors, str(shard), metadata=meta)


def nbytes_per_layer(hidden: int, intermediate: int) -> int:
    return 4 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)


def big(layers: int = 12, hidden: int = 384, intermediate: int = 1152) -> Path:
    """A cached ``write_big_checkpoint`` (long enough to convert that a signal lands mid-way)."""
    tokenizer_from = tiny("llama")  # built first: a nested build would take the same cache slot
    return _cached(("big", layers, hidden, intermediate),
                   lambda out: write_big_checkpoint(out, tokenizer_from, layers=layers, hidden=hidden, intermediate=intermediate))

