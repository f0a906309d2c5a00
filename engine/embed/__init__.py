"""Corpus encoding: ``python -m engine.embed ENGINE_DIR INPUT... --out DIR``.

Streams ``.txt`` / ``.jsonl`` / ``.csv`` / ``.parquet`` inputs through the engine's data path
(:meth:`Engine.tokenize`, :func:`engine.encoder.plan_batches`, :meth:`Engine.embed_tokenized`) into
Parquet or ``.npy`` shards with a ``manifest.json``; resumable, and with ``--workers`` / ``--ray``
spread over a pool of Ray actors (Ray is imported only then). See docs/corpus.md.

Modules: :mod:`.readers` (inputs, the scan, streaming records), :mod:`.embedder` (a chunk of records
to embeddings), :mod:`.output` (shard writers, manifest, the output-directory policy), :mod:`.options`
(the job's options), :mod:`.job` (the job), :mod:`.local` and :mod:`.distributed` (the runners),
:mod:`.cli`. The job is imported on first use of its names, so that the command's ``--help`` is quick.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .options import EmbedOptions

if TYPE_CHECKING:
    from .job import BadRecord, EmbedError, embed_corpus

__all__ = ["BadRecord", "EmbedError", "EmbedOptions", "embed_corpus"]


def __getattr__(name: str) -> Any:
    if name in ("BadRecord", "EmbedError", "embed_corpus"):
        from . import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
