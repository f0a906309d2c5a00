"""Kernel-optimised text-encoder engine for bidirectional decoder LLMs (the LLM2Vec recipe).

``Engine.from_pretrained(path).encode(texts)`` embeds texts with a checkpoint converted by
``python -m converters.hf2engine``.
"""
from .config import ModelConfig
from .encoder import Engine

__all__ = ["Engine", "ModelConfig"]
