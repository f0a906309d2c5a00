"""Training LLM2Vec adapters on the engine's reference model: MNTP, SimCSE, supervised contrastive.

Command line: ``python -m engine.train {mntp,simcse,supervised} --help``; see docs/training.md.
From Python: ``train(make_config("simcse", model=..., lora=[...], data=..., out=...))``.
"""
from .config import DataError, TrainConfig, TrainError, make_config

__all__ = ["DataError", "TrainConfig", "TrainError", "make_config", "train"]


def train(cfg: TrainConfig):
    """Run ``cfg`` (see :func:`engine.train.loop.train`); returns the output directory."""
    from .loop import train as _train

    return _train(cfg)
