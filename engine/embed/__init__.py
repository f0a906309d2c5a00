"""Corpus encoding: ``python -m engine.embed ENGINE_DIR INPUT... --out DIR``.

Streams ``.txt`` / ``.jsonl`` / ``.csv`` / ``.parquet`` inputs through the engine's data path
(:meth:`Engine.tokenize`, :func:`engine.encoder.plan_batches`, :meth:`Engine.embed_tokenized`) into
Parquet or ``.npy`` shards with a ``manifest.json``; resumable, and with ``--workers`` / ``--ray``
spread over a pool of Ray actors (Ray is imported only then). See docs/corpus.md.

Modules: :mod:`.readers` (inputs, the scan, streaming records), :mod:`.embedder` (a chunk of records
to embeddings), :mod:`.output` (shard writers, manifest, the output-directory policy), :mod:`.job`
(options and the job), :mod:`.local` and :mod:`.distributed` (the runners), :mod:`.cli`.
"""
from .job import BadRecord, EmbedError, EmbedOptions, embed_corpus

__all__ = ["BadRecord", "EmbedError", "EmbedOptions", "embed_corpus"]
