"""One embedding job: options, the engine's identity, the output assembled shard by shard.

:func:`embed_corpus` scans the inputs, prepares the output directory (new, ``resume`` or ``force``),
runs the pending shards through a runner -- :func:`engine.embed.local.run_local` in this process,
or :func:`engine.embed.distributed.run_ray` on a pool of Ray actors -- and writes what comes back
with a :class:`ShardSink`. Runners yield :class:`~engine.embed.embedder.Embedded` chunks in passage
order; the sink checks that every record of every pending shard arrives exactly once, in order,
before a shard is renamed into place and recorded in the manifest. The job is marked complete
only if the inputs are still the ones scanned and at least one record was embedded.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from converters.safety import disk_full_line, is_disk_full

from ..choices import COMPUTE_DTYPES
from ..format import ENGINE_CONFIG, EngineConfig, FormatError, model_config_hash, read_index, sha256_file
from .embedder import Embedded
from .output import ERRORS, Manifest, OutputError, append_errors, make_writer, prepare_output
from .options import FORMATS, OUTPUT_DTYPES, EmbedOptions
from .readers import Corpus, Fields, InputError, check_unchanged, scan_corpus

class EmbedError(ValueError):
    """A user-facing failure of an embedding job; ``str(err)`` is the one line the CLI prints."""


class BadRecord(EmbedError):
    """A record that cannot be embedded (without ``skip_bad``): names its file and line."""


def embed_corpus(
    engine_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
    options: EmbedOptions | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Embed the records of ``inputs`` with the engine in ``engine_dir`` into shards in ``out``;
    returns the run's summary (also stored in the manifest). Raises :class:`EmbedError` (one line)
    for bad options, inputs, records or output directories."""
    opts = replace(options or EmbedOptions(), **overrides)
    _validate(opts)
    engine_dir, out = Path(engine_dir), Path(out)
    try:
        config = EngineConfig.read(engine_dir)
        identity = engine_identity(engine_dir, config)
    except FormatError as exc:
        raise EmbedError(str(exc)) from None
    ray_session = None
    try:
        if opts.distributed:
            from .distributed import RaySession

            ray_session = RaySession.connect(opts)
            device = ray_session.device(opts.device)
        else:
            device = _local_device(opts.device)
        settings = resolve_settings(opts, config, device)
        fields = Fields(opts.text_field, opts.id_field or "id", opts.id_field is not None)
        try:
            corpus = scan_corpus(inputs, opts.shard_size, fields)
        except InputError as exc:
            raise EmbedError(str(exc)) from None
        job = {"engine": identity, "inputs": [asdict(f) for f in corpus.files], "options": settings}
        ranges = [corpus.shard_range(k) for k in range(corpus.num_shards)]
        with _disk_full_is_one_line(out):
            try:
                prepared = prepare_output(out, job, ranges, opts.format, resume=opts.resume, force=opts.force,
                                          protected=[Path(f.resolved) for f in corpus.files], engine_dir=engine_dir)
            except OutputError as exc:
                raise EmbedError(str(exc)) from None
            try:
                return _run(opts, engine_dir, corpus, fields, settings, device, prepared, out, config, ray_session)
            except InputError as exc:  # an input that became unreadable, shorter or different during the job
                raise EmbedError(str(exc)) from None
            finally:
                prepared.lock.release()
    finally:
        if ray_session is not None:
            ray_session.close()


@contextmanager
def _disk_full_is_one_line(out: Path) -> Iterator[None]:
    """A full disk while writing ``out`` (ENOSPC or EDQUOT, however the writing library words it)
    becomes one line naming ``out``; by then the shard being written has been removed."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise EmbedError(f"{disk_full_line(out)}; the complete shards are kept: rerun with --resume once there "
                         "is room") from None


def _run(opts, engine_dir, corpus, fields, settings, device, prepared, out, config, ray_session) -> dict[str, Any]:
    manifest = prepared.manifest
    manifest.run = {"engine_path": str(engine_dir.resolve()), "device": str(device), "workers": opts.workers,
                    "ray": opts.ray, "batch_size": opts.batch_size, "max_batch_tokens": opts.max_batch_tokens,
                    "threads": opts.threads, "skip_bad": opts.skip_bad, "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest.save()
    load = {"device": str(device), "dtype": settings["dtype"], "max_length": settings["max_length"]}
    embed = {"prompt": settings["prompt"], "instruction": settings["instruction"], "normalize": settings["normalize"],
             "batch_size": opts.batch_size, "max_batch_tokens": opts.max_batch_tokens,
             "output_dtype": settings["output_dtype"]}
    pending = prepared.pending
    todo = sum(corpus.shard_range(k)[1] - corpus.shard_range(k)[0] for k in pending)
    sink = ShardSink(out, corpus, manifest, pending, opts.format, config.model.hidden_size,
                     np.dtype(settings["output_dtype"]), opts.skip_bad)
    bar = tqdm(total=todo, unit="passage", desc="loading the engine", disable=opts.quiet, file=sys.stderr,
               dynamic_ncols=True)
    start = time.perf_counter()
    began = None  # when the first worker began embedding: the engine is loaded
    stream: Iterator[Embedded] | None = None
    try:
        if pending:
            if ray_session is not None:
                stream = ray_session.run(engine_dir, corpus, fields, pending, load, embed, opts)
            else:
                from .local import run_local

                stream = run_local(engine_dir, corpus, fields, pending, load, embed, threads=opts.threads,
                                   prefetch=device.type == "cuda")
            for chunk in stream:
                if began is None:  # the bar's clock starts with the embedding
                    began = max(start, time.perf_counter() - chunk.seconds)
                    bar.set_description("embed", refresh=False)
                    bar.reset()
                sink.add(chunk)
                bar.update(len(chunk.ids))
                elapsed = time.perf_counter() - began
                bar.set_postfix_str(f"{sink.tokens / max(elapsed, 1e-9):,.0f} tokens/s", refresh=False)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        if stream is not None:
            stream.close()
        bar.close()
    seconds = time.perf_counter() - start
    check_unchanged(corpus)
    if not any(shard.get("rows") for shard in manifest.shards):
        raise EmbedError(f"all {corpus.records:,} records were bad (listed in {out / ERRORS}): nothing was "
                         "embedded, so the job is not complete; check the inputs and --text-field / --id-field")
    summary = sink.summary(seconds, 0.0 if began is None else began - start, kept=len(prepared.resumed))
    manifest.status = "complete"
    manifest.summary = summary
    manifest.save()
    if not opts.quiet:
        for line in summary_lines(summary, out):
            print(line, file=sys.stderr)
    return summary


class ShardSink:
    """Receives the runner's chunks in passage order and writes the pending shards one by one.

    Every record index must arrive exactly once and in order (the pending shards' ranges, one
    after the other): anything else is a bug in a runner and stops the job before a wrong shard is
    published. A bad record stops the job with its location, or with ``skip_bad`` is recorded in
    errors.jsonl when its shard is written.
    """

    def __init__(self, out: Path, corpus: Corpus, manifest: Manifest, pending: list[int], fmt: str, hidden: int,
                 dtype: np.dtype, skip_bad: bool) -> None:
        self.out, self.corpus, self.manifest = out, corpus, manifest
        self.queue = list(reversed(pending))
        self.pending = len(pending)
        self.fmt, self.hidden, self.dtype, self.skip_bad = fmt, hidden, dtype, skip_bad
        self.writer = None
        self.k = self.next = self.end = -1
        self.bad: list[dict[str, Any]] = []
        self.rows = self.records = self.tokens = self.bad_total = 0
        self.workers: dict[str, dict[str, float]] = {}

    def add(self, chunk: Embedded) -> None:
        n = len(chunk.ids)
        stats = self.workers.setdefault(chunk.worker, {"passages": 0, "tokens": 0, "seconds": 0.0})
        stats["passages"] += n
        stats["tokens"] += chunk.tokens
        stats["seconds"] += chunk.seconds
        self.tokens += chunk.tokens
        pos = 0
        while pos < n:
            if self.writer is None:
                self._open()
            take = min(n - pos, self.end - self.next)
            got = chunk.index[pos:pos + take]
            if not np.array_equal(got, np.arange(self.next, self.next + take)):
                raise RuntimeError(f"engine.embed: records arrived out of order or twice (expected {self.next}.."
                                   f"{self.next + take - 1}, got {got[:3].tolist()}...); nothing of shard {self.k} "
                                   "was written")
            good = []
            for j in range(pos, pos + take):
                error = chunk.errors[j]
                if error is None:
                    good.append(j)
                    continue
                where = self.corpus.location(int(chunk.file[j]), int(chunk.line[j]))
                if not self.skip_bad:
                    raise BadRecord(f"{where}: {error} (pass --skip-bad to record such records in errors.jsonl "
                                    "and go on)")
                f = self.corpus.files[int(chunk.file[j])]
                self.bad.append({"index": int(chunk.index[j]), "shard": self.k, "file": f.path,
                                 "line": int(chunk.line[j]), "error": error})
            if good:
                sel = np.asarray(good)
                self.writer.write([chunk.ids[j] for j in good], chunk.embeddings[sel])
            self.next += take
            self.records += take
            pos += take
            if self.next == self.end:
                self._finish()

    def _open(self) -> None:
        if not self.queue:
            raise RuntimeError("engine.embed: the workers returned more records than the pending shards hold")
        self.k = self.queue.pop()
        self.next, self.end = self.corpus.shard_range(self.k)
        self.bad = []
        self.writer = make_writer(self.fmt, self.out, self.k, self.hidden, self.dtype)

    def _finish(self) -> None:
        writer, self.writer = self.writer, None
        rows = writer.rows
        try:
            files = writer.finish()
        except BaseException:
            writer.abort()
            raise
        append_errors(self.out, self.bad)
        self.manifest.complete(self.k, files, rows=rows, bad=len(self.bad))
        self.rows += rows
        self.bad_total += len(self.bad)

    def close(self) -> None:
        if self.writer is not None or self.queue:
            k = self.k if self.writer is not None else self.queue[-1]
            raise RuntimeError(f"engine.embed: the workers stopped before shard {k} was complete")

    def abort(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.abort()

    def summary(self, seconds: float, load_seconds: float, kept: int) -> dict[str, Any]:
        """The run's totals. ``seconds``: its wall time, of which ``load_seconds`` passed before the
        first worker began embedding (loading the engine; with Ray also starting the pool) and
        ``embed_seconds`` after; ``tokens_per_s`` is over ``embed_seconds``."""
        workers = {name: {**s, "tokens_per_s": s["tokens"] / s["seconds"] if s["seconds"] else 0.0}
                   for name, s in sorted(self.workers.items())}
        embed_seconds = seconds - load_seconds
        return {"records": self.records, "passages": self.rows, "bad": self.bad_total, "tokens": int(self.tokens),
                "seconds": seconds, "load_seconds": load_seconds, "embed_seconds": embed_seconds,
                "tokens_per_s": self.tokens / embed_seconds if embed_seconds > 0 else 0.0,
                "shards_written": self.pending, "shards_kept": kept, "workers": workers}


def summary_lines(summary: dict[str, Any], out: Path) -> list[str]:
    lines = [f"engine.embed: {summary['passages']:,} passages ({summary['tokens']:,} tokens) in "
             f"{summary['seconds']:.1f} s: {summary['load_seconds']:.1f} s loading the engine, "
             f"{summary['embed_seconds']:.1f} s embedding: {summary['tokens_per_s']:,.0f} tokens/s; "
             f"{summary['shards_written']} shards written, {summary['shards_kept']} kept from an earlier run"]
    if summary["bad"]:
        lines.append(f"engine.embed: {summary['bad']:,} bad records left out, listed in {out / 'errors.jsonl'}")
    for name, s in summary["workers"].items():
        lines.append(f"  worker {name}: {int(s['passages']):,} passages, {int(s['tokens']):,} tokens, "
                     f"{s['seconds']:.1f} s busy, {s['tokens_per_s']:,.0f} tokens/s")
    return lines


# -- options ------------------------------------------------------------------------------------------------


def _validate(opts: EmbedOptions) -> None:
    def positive(name: str, value: Any, kind: type = int) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value <= 0):
            raise EmbedError(f"{name.replace('_', '-')}={value!r}: expected a positive {kind.__name__}")

    if opts.format not in FORMATS:
        raise EmbedError(f"format={opts.format!r}: expected one of {', '.join(FORMATS)}")
    if opts.output_dtype not in OUTPUT_DTYPES:
        raise EmbedError(f"output-dtype={opts.output_dtype!r}: expected one of {', '.join(OUTPUT_DTYPES)}")
    if opts.dtype not in COMPUTE_DTYPES:
        raise EmbedError(f"dtype={opts.dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    for name in ("shard_size", "batch_size", "max_batch_tokens", "workers", "threads", "max_length"):
        positive(name, getattr(opts, name))
    if isinstance(opts.gpus_per_worker, bool) or not isinstance(opts.gpus_per_worker, (int, float)) \
            or opts.gpus_per_worker <= 0:
        raise EmbedError(f"gpus-per-worker={opts.gpus_per_worker!r}: expected a positive number")
    if opts.instruction is not None and opts.prompt_name is not None:
        raise EmbedError("give --instruction or --prompt-name, not both")
    if opts.instruction is not None and not isinstance(opts.instruction, str):
        raise EmbedError("instruction must be a string")
    if opts.resume and opts.force:
        raise EmbedError("give --resume or --force, not both")
    if not opts.text_field or (opts.id_field is not None and not opts.id_field):
        raise EmbedError("--text-field and --id-field must not be empty")
    if opts.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise EmbedError("Parquet output needs pyarrow: pip install -e .[corpus] (or use --format npy)") from None


def _local_device(value: str | None):
    import torch

    from ..device import resolve_device

    if value is None:
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return resolve_device(value, "--device")
    except ValueError as exc:
        raise EmbedError(str(exc)) from None


def resolve_settings(opts: EmbedOptions, config: EngineConfig, device: Any) -> dict[str, Any]:
    """The options the output depends on, with every default resolved against the engine (what the
    manifest records and a resume must match)."""
    dtype = opts.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    max_length = config.max_length if opts.max_length is None else opts.max_length
    limit = config.model.max_position_embeddings
    if limit is not None and max_length > limit:
        raise EmbedError(f"--max-length {max_length} exceeds the model's max_position_embeddings={limit}")
    if opts.prompt_name is not None:
        if opts.prompt_name not in config.prompts:
            known = ", ".join(sorted(config.prompts)) or "the engine stores none"
            raise EmbedError(f"--prompt-name {opts.prompt_name!r}: unknown prompt ({known})")
        prompt = config.prompts[opts.prompt_name]
    elif opts.instruction is None and config.default_prompt_name is not None:
        prompt = config.prompts[config.default_prompt_name]
    else:
        prompt = None
    return {
        "format": opts.format,
        "output_dtype": opts.output_dtype,
        "dtype": dtype,
        "normalize": config.normalize if opts.normalize is None else bool(opts.normalize),
        "max_length": max_length,
        "prompt": prompt,
        "instruction": opts.instruction,
        "text_field": opts.text_field,
        "id_field": opts.id_field or "id",
        "id_field_explicit": opts.id_field is not None,
        "shard_size": opts.shard_size,
    }


def engine_identity(engine_dir: Path, config: EngineConfig) -> dict[str, Any]:
    """What identifies the engine's output: the model config hash (as every weight shard records
    it), a hash over the per-shard sha256 of ``weights.index.json``, and the hashes of
    ``engine_config.json`` (pooling, prompts, defaults) and the tokenizer."""
    index = read_index(engine_dir)
    if index.sha256:
        record = sorted(index.sha256.items())
    else:  # no digests recorded: names and sizes at least
        record = sorted((f, (engine_dir / f).stat().st_size) for f in index.files)
    tokenizer = engine_dir / "tokenizer.json"
    return {
        "family": config.model.family,
        "hidden_size": config.model.hidden_size,
        "pooling": config.pooling,
        "model_config_sha256": model_config_hash(config.model),
        "weights_sha256": hashlib.sha256(json.dumps(record).encode()).hexdigest(),
        "engine_config_sha256": sha256_file(engine_dir / ENGINE_CONFIG),
        "tokenizer_sha256": sha256_file(tokenizer) if tokenizer.is_file() else None,
    }
