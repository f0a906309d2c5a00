"""One chunk of records -> embeddings, on the engine's own data path; run by every worker.

:meth:`ChunkEmbedder.prepare` validates and tokenises a chunk with :meth:`Engine.tokenize` (a record
the engine refuses becomes a bad record naming its file and line), and :meth:`ChunkEmbedder.embed`
runs the batches :func:`engine.encoder.plan_batches` makes, each one packed forward of
:meth:`Engine.embed_tokenized`: the same steps as :meth:`Engine.encode`, so the rows are the ones
``encode`` gives for the same passages.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..encoder import Engine, plan_batches
from ..inputs import TokenizedExample
from .readers import Record


@dataclass
class Embedded:
    """A chunk's result, records in order: ``index``/``ids``/``file``/``line``/``errors`` per record
    (``errors[i]`` None for an embedded record), ``embeddings`` ``[records, hidden]`` in the output
    dtype (rows of bad records are zero), and the worker's ``tokens`` and busy ``seconds``."""

    index: np.ndarray
    ids: list[str]
    file: np.ndarray
    line: np.ndarray
    errors: list[str | None]
    embeddings: np.ndarray
    tokens: int
    seconds: float
    worker: str

    def to_columns(self) -> dict[str, Any]:
        """Columns of equal length, as Ray Data carries them (``error`` "" for good records;
        the worker's totals on the first row, zero on the others)."""
        n = len(self.ids)
        tokens = np.zeros(n, np.int64)
        seconds = np.zeros(n, np.float64)
        if n:
            tokens[0], seconds[0] = self.tokens, self.seconds
        return {"index": self.index, "id": np.array(self.ids, dtype=object), "file": self.file, "line": self.line,
                "error": np.array([e or "" for e in self.errors], dtype=object), "embedding": self.embeddings,
                "tokens": tokens, "seconds": seconds, "worker": np.array([self.worker] * n, dtype=object)}

    @classmethod
    def from_columns(cls, batch: dict[str, np.ndarray]) -> "Embedded":
        workers = batch["worker"]
        return cls(np.asarray(batch["index"], np.int64), [str(i) for i in batch["id"]], np.asarray(batch["file"]),
                   np.asarray(batch["line"]), [str(e) or None for e in batch["error"]], np.asarray(batch["embedding"]),
                   int(np.sum(batch["tokens"])), float(np.sum(batch["seconds"])),
                   str(workers[0]) if len(workers) else "")


@dataclass
class Tokenized:
    """A tokenised chunk: the records, and for the good ones their tokens (``items[j]`` belongs to
    ``records[good[j]]``); ``errors`` per record."""

    records: list[Record]
    good: list[int]
    items: list[TokenizedExample]
    errors: list[str | None]
    seconds: float
    tokens: int


class ChunkEmbedder:
    """Embeds chunks of records with ``engine``. ``prompt``: the prompt prepended to every passage
    (already resolved: None for none); ``instruction``: read ``(instruction, text)`` pairs instead
    (no prompt then)."""

    def __init__(
        self, engine: Engine, *, prompt: str | None, instruction: str | None, normalize: bool, batch_size: int,
        max_batch_tokens: int, output_dtype: str, worker: str,
    ) -> None:
        self.engine = engine
        self.prompt = "" if instruction is not None else (prompt or "")
        self.instruction = instruction
        self.normalize = normalize
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.dtype = np.dtype(output_dtype)
        self.worker = worker

    def _inputs(self, records: Sequence[Record]) -> list[Any]:
        if self.instruction is not None:
            return [(self.instruction, r.text) for r in records]
        return [r.text for r in records]

    def prepare(self, records: list[Record]) -> Tokenized:
        """Tokenise the good records; one the engine refuses is marked bad with the engine's reason."""
        start = time.perf_counter()
        errors = [r.error for r in records]
        good = [i for i, e in enumerate(errors) if e is None]
        try:
            items = self.engine.tokenize(self._inputs([records[i] for i in good]), prompt=self.prompt)
        except (ValueError, TypeError):
            # Rare: find the refused records one by one (the error names its index in the call).
            items, kept = [], []
            for i in good:
                try:
                    (item,) = self.engine.tokenize(self._inputs([records[i]]), prompt=self.prompt)
                except (ValueError, TypeError) as exc:
                    errors[i] = str(exc).removeprefix("input 0: ")
                    continue
                items.append(item)
                kept.append(i)
            good = kept
        return Tokenized(records, good, items, errors, time.perf_counter() - start,
                        sum(t.num_tokens for t in items))

    def embed(self, prepared: Tokenized) -> Embedded:
        """The chunk's embeddings: the batches of :func:`plan_batches`, each one packed forward."""
        start = time.perf_counter()
        items, records, errors = prepared.items, prepared.records, list(prepared.errors)
        hidden = self.engine.hidden_size
        out = torch.empty((len(items), hidden), dtype=torch.float32)
        for chunk in plan_batches([t.num_tokens for t in items], self.batch_size, self.max_batch_tokens):
            out[torch.tensor(chunk)] = self.engine.embed_tokenized([items[i] for i in chunk], self.normalize)
        rows = out.numpy()
        result = np.zeros((len(records), hidden), dtype=self.dtype)
        if items:
            cast = rows.astype(self.dtype, copy=False)
            finite = np.isfinite(cast).all(axis=1)
            for j in np.flatnonzero(~finite):
                errors[prepared.good[j]] = (
                    "its embedding exceeds the float16 range; use --output-dtype float32 or --normalize"
                    if np.isfinite(rows[j]).all() else "its embedding is not finite (NaN or infinity)")
            result[np.asarray(prepared.good)[finite]] = cast[finite]
        return Embedded(
            index=np.fromiter((r.index for r in records), np.int64, len(records)),
            ids=[r.id for r in records],
            file=np.fromiter((r.file for r in records), np.int64, len(records)),
            line=np.fromiter((r.line for r in records), np.int64, len(records)),
            errors=errors,
            embeddings=result,
            tokens=prepared.tokens,
            seconds=prepared.seconds + time.perf_counter() - start,
            worker=self.worker,
        )
