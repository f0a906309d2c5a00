"""The local runner: one engine in this process embeds the pending shards in order.

Records are read and tokenised in chunks of at most :data:`CHUNK` records (never across a shard),
so memory is bounded by a chunk whatever the corpus. On CUDA the next chunk is read and tokenised
by a background thread while the GPU runs the current one; on the CPU every stage competes for the
same cores, so the stages run one after the other (overlapping them there only oversubscribes).
"""
from __future__ import annotations

import queue
import threading
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, TypeVar

from ..encoder import Engine
from .embedder import ChunkEmbedder, Embedded, Tokenized
from .readers import Corpus, Fields, iter_shard

CHUNK = 4096  # records tokenised and batched together (plan_batches sorts within a chunk)
T = TypeVar("T")


def run_local(
    engine_dir: Path, corpus: Corpus, fields: Fields, pending: list[int], load: dict[str, Any], embed: dict[str, Any],
    *, threads: int | None = None, prefetch: bool = False, chunk: int = CHUNK,
) -> Iterator[Embedded]:
    """Embedded chunks of the ``pending`` shards, in passage order."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        engine = Engine.from_pretrained(engine_dir, **load)
        embedder = ChunkEmbedder(engine, worker="local", **embed)
        source = _tokenized(embedder, corpus, fields, pending, chunk)
        if prefetch:
            source = prefetched(source, depth=2)
        try:
            for tokenized in source:
                yield embedder.embed(tokenized)
        finally:
            source.close()
    finally:
        torch.set_num_threads(previous)


def _tokenized(embedder: ChunkEmbedder, corpus: Corpus, fields: Fields, pending: list[int],
               chunk: int) -> Iterator[Tokenized]:
    for k in pending:
        records = iter_shard(corpus, k, fields)
        try:
            while batch := list(islice(records, chunk)):
                yield embedder.prepare(batch)
        finally:
            records.close()


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items`` produced by a background thread at most ``depth`` ahead of the consumer. An error
    in the producer is raised in the consumer; a consumer that stops early stops the producer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put(("error", exc))

    thread = threading.Thread(target=produce, name="engine.embed-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()
