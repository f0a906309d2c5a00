"""The Ray runner: the corpus as a Ray dataset, embedded by a pool of actors, written by the driver.

Imported only for ``--workers`` / ``--ray``. The pipeline:

1. ``ray.data.from_items`` over the pending shard numbers, one block each;
2. ``map_batches(read_shards)``: Ray tasks, pinned to the driver's node (the inputs need to exist
   only where the command runs), each reading one shard with :func:`~engine.embed.readers.iter_shard`
   and yielding it in blocks;
3. ``map_batches(EmbedWorker, compute=ActorPoolStrategy(size=N), num_gpus=...)``: a fixed pool of
   actors, each loading the engine once in its constructor (``--gpus-per-worker`` GPUs each on
   CUDA; ``--threads`` CPUs and torch threads each on the CPU); the engine directory must exist at
   the same path on every node;
4. the driver iterates the results with ``preserve_order`` on, so chunks arrive in passage order,
   and writes each shard when its last record has arrived.

Fault tolerance: Ray Data creates the pool's actors with ``max_restarts=-1`` and
``max_task_retries=-1`` (its defaults for actor pools; extra ``ray_remote_args`` to change them are
deprecated in Ray 2.60): a killed actor is restarted, loads the engine again, and its unfinished
batches run again. A batch's result only counts once it reaches the driver, which checks that
every record arrives exactly once (:class:`~engine.embed.job.ShardSink`). A job that fails anyway
leaves its complete shards recorded; ``--resume`` finishes it.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .embedder import ChunkEmbedder, Embedded
from .job import EmbedError, EmbedOptions
from .local import CHUNK
from .readers import Corpus, Fields, Record, iter_shard

NODE_ID_LABEL = "ray.io/node-id"  # a label Ray gives every node
# Concurrent shard-reading tasks: one per 8 workers, at most 4 (reading a record costs microseconds,
# embedding it milliseconds); every extra one is another process that imports the package and torch.
_WORKERS_PER_READER, _MAX_READERS = 8, 4


def read_shards(batch: dict[str, np.ndarray], *, corpus: dict[str, Any], fields: dict[str, Any],
                block: int) -> Iterator[dict[str, Any]]:
    """A Ray Data UDF: the records of the shards in ``batch["shard"]`` as blocks of ``block`` rows."""
    plan, flds = Corpus.from_dict(corpus), Fields(**fields)
    for k in batch["shard"]:
        rows: list[Record] = []
        for record in iter_shard(plan, int(k), flds):
            rows.append(record)
            if len(rows) == block:
                yield _record_columns(rows)
                rows = []
        if rows:
            yield _record_columns(rows)


def _record_columns(rows: list[Record]) -> dict[str, Any]:
    return {"index": np.fromiter((r.index for r in rows), np.int64, len(rows)),
            "id": np.array([r.id for r in rows], dtype=object),
            "text": np.array([r.text for r in rows], dtype=object),
            "file": np.fromiter((r.file for r in rows), np.int64, len(rows)),
            "line": np.fromiter((r.line for r in rows), np.int64, len(rows)),
            "error": np.array([r.error or "" for r in rows], dtype=object)}


class EmbedWorker:
    """A Ray Data actor: loads the engine once, then embeds each batch of records it is given."""

    def __init__(self, engine_dir: str, load: dict[str, Any], embed: dict[str, Any], threads: int | None) -> None:
        import torch

        from ..encoder import Engine

        if threads is not None:
            torch.set_num_threads(threads)
        engine = Engine.from_pretrained(engine_dir, **load)
        self.embedder = ChunkEmbedder(engine, worker=f"{socket.gethostname()}:{os.getpid()}", **embed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        records = [Record(int(i), str(d), str(t), int(f), int(n), str(e) or None)
                   for i, d, t, f, n, e in zip(batch["index"], batch["id"], batch["text"], batch["file"],
                                                batch["line"], batch["error"])]
        return self.embedder.embed(self.embedder.prepare(records)).to_columns()


class RaySession:
    """A connection to Ray for one job: started here (``--workers`` alone: a local instance,
    shut down at the end), or joined (an instance already initialised in this process, or
    ``--ray ADDRESS``)."""

    def __init__(self, started: bool) -> None:
        self.started = started

    @classmethod
    def connect(cls, opts: EmbedOptions) -> "RaySession":
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise EmbedError("--workers / --ray need Ray Data: pip install -e .[distributed]") from None
        if opts.ray is not None and opts.ray.startswith("ray://"):
            raise EmbedError("--ray: Ray Client addresses (ray://) are not supported; run the command on a node "
                             "of the cluster (or with `ray job submit`) and pass --ray auto")
        if ray.is_initialized():
            return cls(started=False)
        logging.getLogger("ray").setLevel(logging.WARNING)
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
        if opts.ray is None:  # --workers alone: a private local instance that runs this checkout's code
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
            kwargs["num_cpus"] = max(os.cpu_count() or 1, opts.workers * (opts.threads or 1))
        elif opts.ray:
            kwargs["address"] = opts.ray
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise EmbedError(f"cannot start or reach Ray ({' '.join(str(exc).split())[:300]})") from None
        return cls(started=True)

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def device(self, value: str | None):
        """The workers' device: ``cpu`` or ``cuda`` (Ray assigns each worker its GPUs, so no index);
        by default ``cuda`` when the cluster has GPUs."""
        import ray
        import torch

        if value is None:
            value = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        if value not in ("cpu", "cuda"):
            raise EmbedError(f"--device {value!r}: with --workers / --ray give cpu or cuda (Ray assigns each worker "
                             "its GPU)")
        return torch.device(value)

    def run(self, engine_dir: Path, corpus: Corpus, fields: Fields, pending: list[int], load: dict[str, Any],
            embed: dict[str, Any], opts: EmbedOptions) -> Iterator[Embedded]:
        """Embedded chunks of the ``pending`` shards in passage order, from a pool of actors."""
        import ray
        import ray.data

        cuda = load["device"] == "cuda"
        resources = ray.cluster_resources()
        workers = opts.workers
        if workers is None:  # --ray without --workers: one worker per GPU group, or per CPU group
            per = opts.gpus_per_worker if cuda else (opts.threads or 1)
            workers = max(1, int(resources.get("GPU" if cuda else "CPU", 0) // per))
        if cuda and opts.ray is None and resources.get("GPU", 0) < workers * opts.gpus_per_worker:
            raise EmbedError(f"--workers {workers} x --gpus-per-worker {opts.gpus_per_worker:g} needs "
                             f"{workers * opts.gpus_per_worker:g} GPUs; Ray sees {resources.get('GPU', 0):g}")
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
        ctx.execution_options.preserve_order = True  # chunks reach the driver in passage order
        ctx.enable_progress_bars = False  # the driver shows its own
        ctx.print_on_execution_start = False
        chunk = min(CHUNK, corpus.shard_size)
        here = {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}
        ds = ray.data.from_items([{"shard": k} for k in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            read_shards, batch_size=1, fn_kwargs={"corpus": corpus.to_dict(), "fields": asdict(fields), "block": chunk},
            compute=ray.data.TaskPoolStrategy(size=min(_MAX_READERS, 1 + (workers - 1) // _WORKERS_PER_READER)),
            num_cpus=0, label_selector=here)
        worker_resources = {"num_gpus": opts.gpus_per_worker, "num_cpus": 1} if cuda else {"num_cpus": opts.threads or 1}
        ds = ds.map_batches(
            EmbedWorker, batch_size=chunk,
            fn_constructor_kwargs={"engine_dir": str(engine_dir.resolve()), "load": load, "embed": embed,
                                   "threads": None if cuda else (opts.threads or 1)},
            compute=ray.data.ActorPoolStrategy(size=workers), **worker_resources)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
        try:
            for batch in batches:
                yield Embedded.from_columns(batch)
        except ray.exceptions.RayError as exc:
            raise EmbedError(f"the Ray job failed: {_ray_reason(exc)}; complete shards are kept: rerun with "
                             "--resume") from None
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _ray_reason(exc: BaseException) -> str:
    """The innermost cause of a Ray error, on one line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__
