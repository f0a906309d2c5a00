"""Kernel-optimised text-encoder engine for bidirectional decoder LLMs (the LLM2Vec recipe).

``Engine.from_pretrained(path).encode(texts)`` embeds texts with a checkpoint converted by
``python -m converters.hf2engine``. The model code (torch, triton, transformers' tokenizers) is
imported on first use of ``engine.Engine`` or ``engine.ModelConfig``, so that the commands under
``engine`` answer ``--help`` and usage errors without loading it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ModelConfig
    from .encoder import Engine

__all__ = ["Engine", "ModelConfig"]
_LAZY = {"Engine": "encoder", "ModelConfig": "config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
