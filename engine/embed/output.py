"""The output directory: shard files, ``manifest.json``, ``errors.jsonl``, and what may be replaced.

Layout of ``--out DIR``:

- ``shard-NNNNN.parquet``: columns ``id`` (string) and ``embedding`` (fixed-size list of float32, or
  float16 with ``--output-dtype float16``), the shard's valid records in passage order; or, with
  ``--format npy``, ``shard-NNNNN.npy`` (``[rows, hidden]``) beside ``shard-NNNNN.ids.jsonl`` (one
  JSON string per line, row for row).
- ``manifest.json``: the engine's identity, the inputs (paths, sizes, record counts), the options the
  output depends on, and every shard (record range, and once complete: rows, bad records, files with
  size and sha256); ``status`` is ``"complete"`` only when every shard is.
- ``errors.jsonl`` (``--skip-bad``): one object per record left out: passage index, shard, file,
  line (row for Parquet) and why.
- ``.lock``: held (``flock``) while a job writes the directory; a refused job leaves none behind.

Every file is written under a temporary name (``.NAME.tmp-*``) and renamed when complete; a shard
counts as complete only once ``manifest.json`` records it (after the rename), so a job killed at any
point leaves nothing that passes for finished output. Only names this module writes are ever
deleted, and never a path that resolves to an input or into the engine directory.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..format import sha256_file

OUTPUT_FORMAT = "llm-encoder-engine-embeddings"
OUTPUT_VERSION = 1
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
LOCK = ".lock"
_SHARD_NAME = re.compile(r"^shard-\d{5,}\.(parquet|npy|ids\.jsonl)$")
_TEMP_NAME = re.compile(r"^\.(shard-\d{5,}\.(parquet|npy|ids\.jsonl)|manifest\.json|errors\.jsonl)\.tmp-[0-9a-f]+$")
_NPY_HEADER = 128  # bytes reserved for the .npy header, written once the row count is known
_PARQUET_ROW_GROUP = 4096


class OutputError(ValueError):
    """A refusal about the output directory (one line)."""


def shard_names(k: int, fmt: str) -> list[str]:
    """The files of shard ``k``; for npy the ids file comes first (renamed first, so the .npy
    appearing means both are in place)."""
    stem = f"shard-{k:05d}"
    return [f"{stem}.parquet"] if fmt == "parquet" else [f"{stem}.ids.jsonl", f"{stem}.npy"]


def _temp_name(directory: Path, name: str) -> Path:
    return directory / f".{name}.tmp-{secrets.token_hex(6)}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` replaced by ``data`` all at once (temporary file, fsync, rename)."""
    tmp = _temp_name(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- shard writers ------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes one shard under temporary names: :meth:`write` rows in order, then :meth:`finish`
    (renames, returns ``{name: {"size", "sha256"}}``) or :meth:`abort` (removes the temporaries)."""

    def __init__(self, directory: Path, k: int, hidden: int, dtype: np.dtype) -> None:
        self.directory, self.k, self.hidden, self.dtype = directory, k, hidden, np.dtype(dtype)
        self.rows = 0

    def write(self, ids: list[str], embeddings: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def _publish(self, temps: list[tuple[Path, str]]) -> dict[str, dict[str, Any]]:
        files = {}
        for tmp, name in temps:
            files[name] = {"size": tmp.stat().st_size, "sha256": sha256_file(tmp)}
        for tmp, name in temps:
            os.replace(tmp, self.directory / name)
        _fsync_dir(self.directory)
        return files


class ParquetShardWriter(ShardWriter):
    """``id`` string, ``embedding`` fixed-size list; one row group per :meth:`write` (at most
    4096 rows each); embeddings stored plain and uncompressed (random floats neither compress nor
    repeat: pyarrow's default dictionary encoding stored them in about 1.5x their size)."""

    def __init__(self, directory: Path, k: int, hidden: int, dtype: np.dtype) -> None:
        super().__init__(directory, k, hidden, dtype)
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        value = pa.float16() if self.dtype == np.float16 else pa.float32()
        self.schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(value, hidden))])
        (self.name,) = shard_names(k, "parquet")
        self.tmp = _temp_name(directory, self.name)
        self._writer = pq.ParquetWriter(self.tmp, self.schema, compression={"id": "zstd", "embedding": "none"},
                                        use_dictionary=False, write_statistics=["id"])

    def write(self, ids: list[str], embeddings: np.ndarray) -> None:
        pa = self._pa
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=self.dtype).reshape(-1))
        table = pa.Table.from_arrays([pa.array(ids, pa.string()), pa.FixedSizeListArray.from_arrays(flat, self.hidden)],
                                     schema=self.schema)
        self._writer.write_table(table, row_group_size=_PARQUET_ROW_GROUP)
        self.rows += len(ids)

    def finish(self) -> dict[str, dict[str, Any]]:
        if self.rows == 0:  # an empty shard still gets a (valid, empty) file
            self._writer.write_table(self.schema.empty_table())
        self._writer.close()
        _fsync(self.tmp)
        return self._publish([(self.tmp, self.name)])

    def abort(self) -> None:
        _discard(self._writer, self.tmp)


class NpyShardWriter(ShardWriter):
    """``shard-NNNNN.npy`` written row by row after a reserved header (the row count is known only
    at the end: bad records are left out), plus the ids as JSON lines."""

    def __init__(self, directory: Path, k: int, hidden: int, dtype: np.dtype) -> None:
        super().__init__(directory, k, hidden, dtype)
        self.ids_name, self.name = shard_names(k, "npy")
        self.ids_tmp, self.tmp = _temp_name(directory, self.ids_name), _temp_name(directory, self.name)
        self._ids = open(self.ids_tmp, "w", encoding="utf-8")
        self._data = open(self.tmp, "wb")
        self._data.write(b"\0" * _NPY_HEADER)

    def write(self, ids: list[str], embeddings: np.ndarray) -> None:
        self._ids.write("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids))
        self._data.write(np.ascontiguousarray(embeddings, dtype=self.dtype.newbyteorder("<")).tobytes())
        self.rows += len(ids)

    def finish(self) -> dict[str, dict[str, Any]]:
        self._data.seek(0)
        self._data.write(npy_header(self.dtype, (self.rows, self.hidden)))
        for f in (self._ids, self._data):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return self._publish([(self.ids_tmp, self.ids_name), (self.tmp, self.name)])

    def abort(self) -> None:
        try:
            _discard(self._ids, self.ids_tmp)
        finally:
            _discard(self._data, self.tmp)


def _discard(f: Any, tmp: Path) -> None:
    """Close ``f`` and remove its temporary ``tmp``. A close that fails (on a full disk the buffered
    bytes do not fit) does not matter for a file that is removed: the error that caused the abort
    is the one to report."""
    try:
        f.close()
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def npy_header(dtype: np.dtype, shape: tuple[int, int]) -> bytes:
    """A .npy version 1.0 header of exactly ``_NPY_HEADER`` bytes (space padded, as the format
    allows) for a C-order little-endian array."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype).newbyteorder("<"))
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    body_len = _NPY_HEADER - 10  # magic (6) + version (2) + header length (2)
    body = text.encode("latin1").ljust(body_len - 1) + b"\n"
    if len(body) != body_len:
        raise OutputError(f"shape {shape}: the .npy header does not fit in {_NPY_HEADER} bytes")
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_writer(fmt: str, directory: Path, k: int, hidden: int, dtype: np.dtype) -> ShardWriter:
    return (ParquetShardWriter if fmt == "parquet" else NpyShardWriter)(directory, k, hidden, dtype)


# -- the manifest -------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """``manifest.json``. ``job`` holds what the output depends on (``engine``, ``inputs``,
    ``options``: a resume must match it exactly); ``shards`` one entry per shard; ``run`` how the
    latest run was executed (free to change between runs); ``summary`` the latest run's totals."""

    path: Path
    job: dict[str, Any]
    shards: list[dict[str, Any]]
    status: str = "running"
    run: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None

    @classmethod
    def new(cls, directory: Path, job: dict[str, Any], ranges: Iterable[tuple[int, int]], fmt: str) -> "Manifest":
        shards = [{"index": k, "first": first, "records": end - first, "names": shard_names(k, fmt),
                   "complete": False} for k, (first, end) in enumerate(ranges)]
        return cls(directory / MANIFEST, job, shards)

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = directory / MANIFEST
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise OutputError(f"{path}: not readable as an engine.embed manifest ({_one_line(exc)})") from None
        if not isinstance(data, dict) or data.get("format") != OUTPUT_FORMAT:
            raise OutputError(f"{path}: not written by engine.embed (format={_get(data, 'format')!r}); not touching it")
        if data.get("version") != OUTPUT_VERSION:
            raise OutputError(f"{path}: manifest version {data.get('version')!r}; this engine.embed reads "
                              f"version {OUTPUT_VERSION}")
        try:
            return cls(path, data["job"], list(data["shards"]), data["status"], data.get("run"), data.get("summary"))
        except (KeyError, TypeError) as exc:
            raise OutputError(f"{path}: incomplete manifest ({_one_line(exc)})") from None

    def save(self) -> None:
        data = {"format": OUTPUT_FORMAT, "version": OUTPUT_VERSION, "status": self.status, "job": self.job,
                "run": self.run, "summary": self.summary, "shards": self.shards}
        write_atomic(self.path, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))

    def listed_names(self) -> set[str]:
        names = {MANIFEST, ERRORS}
        for shard in self.shards:
            names.update(n for n in shard.get("names", []) if _SHARD_NAME.match(str(n)))
        return names

    def complete(self, k: int, files: dict[str, dict[str, Any]], rows: int, bad: int) -> None:
        self.shards[k].update(complete=True, rows=rows, bad=bad, files=files)
        self.save()


def _get(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def first_difference(old: Any, new: Any, where: str = "") -> str | None:
    """The first place two JSON values differ, as ``"where: old -> new"`` (None when equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            diff = first_difference(a, b, f"{where}[{i}]")
            if diff:
                return diff
        return None
    if old != new:
        def show(v: Any) -> str:
            text = json.dumps(v, ensure_ascii=False)
            return text if len(text) <= 80 else text[:77] + "..."
        return f"{where or 'value'}: {show(old)} -> {show(new)}"
    return None


# -- errors.jsonl -------------------------------------------------------------------------------------------


def append_errors(directory: Path, lines: list[dict[str, Any]]) -> None:
    """Append records of a finished shard to errors.jsonl (before the manifest marks it complete)."""
    if not lines:
        return
    with open(directory / ERRORS, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in lines))
        f.flush()
        os.fsync(f.fileno())


def keep_errors_of(directory: Path, shards: set[int]) -> None:
    """Rewrite errors.jsonl with only the lines of ``shards`` (the complete ones, on resume):
    lines of a shard that is redone would otherwise appear twice."""
    path = directory / ERRORS
    if not path.exists():
        return
    tmp = _temp_name(directory, ERRORS)
    try:
        with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            for line in src:
                try:
                    shard = json.loads(line).get("shard")
                except (ValueError, AttributeError):
                    continue  # a torn last line of a killed job
                if shard in shards:
                    dst.write(line if line.endswith("\n") else line + "\n")
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- the directory policy -----------------------------------------------------------------------------------


class DirectoryLock:
    """An exclusive ``flock`` on ``DIR/.lock`` for the job's lifetime (released by the kernel if
    the process dies, so a killed job never leaves the directory locked). ``created``: this job
    made the file; a refused job removes the file it made (:meth:`release` with ``remove``), so a
    lock counts only while the file at ``DIR/.lock`` is still the one locked."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK
        busy = OutputError(f"{directory}: another engine.embed job is writing this directory")
        try:
            self.fd, self.created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                self.fd, self.created = os.open(self.path, os.O_RDWR), False
            except FileNotFoundError:  # removed in between by a job that was refused
                raise busy from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                raise BlockingIOError(errno.EAGAIN, "the lock file was replaced")
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.ENOENT):
                raise busy from None
            raise

    def release(self, remove: bool = False) -> None:
        """Unlock; ``remove``: also delete the lock file if this job created it (still holding it)."""
        try:
            if remove and self.created:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


@dataclass
class Prepared:
    """An output directory ready for the job: its manifest and the shards left to compute."""

    manifest: Manifest
    pending: list[int]
    resumed: list[int]
    lock: DirectoryLock


@dataclass
class _Plan:
    """What preparing the directory does: remove our stale files ``delete``, then save ``manifest``;
    ``resumed`` (None for a new job) are the complete shards kept, whose errors.jsonl lines stay."""

    manifest: Manifest
    pending: list[int]
    resumed: list[int] | None
    delete: list[Path]


def prepare_output(
    out: Path, job: dict[str, Any], ranges: list[tuple[int, int]], fmt: str, *, resume: bool, force: bool,
    protected: list[Path], engine_dir: Path,
) -> Prepared:
    """Check ``out`` against the flags, lock it, and return the manifest and the pending shards.

    New job: ``out`` must not exist or be empty. ``resume``: a manifest of the same job (engine,
    inputs, options) whose complete shards are checked (size and sha256) and kept; the rest is
    redone. ``force``: our own files (those the old manifest lists, our temporaries) are replaced,
    nothing else; a name we are about to write that is not ours is refused. ``protected`` (the
    inputs) and the engine directory are never deleted or overwritten: resolved paths are compared.

    A refused job changes nothing: the checks run once before anything is written (not even the
    lock file), then again under the lock (another job may have changed ``out`` in between).
    """
    out_resolved = out.resolve()
    engine_resolved = engine_dir.resolve()
    if out_resolved == engine_resolved or engine_resolved in out_resolved.parents:
        raise OutputError(f"{out}: is the engine directory or inside it; choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    guarded = {p.resolve() for p in protected}
    existed = out.exists()
    if existed:
        _plan(out, job, ranges, fmt, resume, force, guarded, verify=False)
    out.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(out)
    try:
        plan = _plan(out, job, ranges, fmt, resume, force, guarded, verify=True)
        _apply(out, plan)
    except BaseException:
        lock.release(remove=True)
        if not existed and not any(out.iterdir()):
            out.rmdir()
        raise
    return Prepared(plan.manifest, plan.pending, plan.resumed or [], lock)


def _plan(
    out: Path, job: dict[str, Any], ranges: list[tuple[int, int]], fmt: str, resume: bool, force: bool,
    protected: set[Path], verify: bool,
) -> _Plan:
    """What this job does to ``out``, or its refusal (:class:`OutputError`); reads only. ``verify``:
    hash the complete shards of a resumed job (the pass under the lock; the first pass assumes them
    intact)."""
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    has_manifest = (out / MANIFEST).exists()
    if resume and has_manifest:
        return _plan_resume(out, job, ranges, fmt, protected, verify)
    if entries and not force:
        if has_manifest:
            raise OutputError(f"{out}: holds an earlier embedding job; pass --resume to finish it or --force to "
                              "replace its output")
        if resume:
            raise OutputError(f"{out}: has no {MANIFEST}, nothing to resume (and it is not empty)")
        raise OutputError(f"{out}: exists and is not empty; choose a new --out, or pass --force to write there "
                          "(only files written by engine.embed are ever replaced)")
    ours: set[str] = {n for n in entries if _TEMP_NAME.match(n)}
    if has_manifest:  # --force over an earlier job: its own files go
        old = Manifest.read(out)
        ours |= {n for n in old.listed_names() if n in entries}
    manifest = Manifest.new(out, job, ranges, fmt)
    # What this job will write must either not exist or be ours to replace.
    for name in sorted(manifest.listed_names() - ours):
        if (out / name).exists() or (out / name).is_symlink():
            raise OutputError(f"{out / name}: exists and was not written by an engine.embed job here; "
                              "not replacing it (move it, or choose another --out)")
    return _Plan(manifest, list(range(len(ranges))), None, _deletable(out, sorted(ours), protected))


def _plan_resume(
    out: Path, job: dict[str, Any], ranges: list[tuple[int, int]], fmt: str, protected: set[Path], verify: bool,
) -> _Plan:
    old = Manifest.read(out)
    diff = first_difference(old.job, job)
    if diff:
        raise OutputError(f"{out}: cannot resume, the job differs from the one started there ({diff}); "
                          "pass --force to start over")
    expected = [{"first": f, "records": e - f, "names": shard_names(k, fmt)} for k, (f, e) in enumerate(ranges)]
    got = [{key: s.get(key) for key in ("first", "records", "names")} for s in old.shards]
    if got != expected:
        raise OutputError(f"{out}/{MANIFEST}: its shard list does not match the inputs; pass --force to start over")
    kept = []
    for k, shard in enumerate(old.shards):
        if shard.get("complete") and (not verify or _shard_intact(out, shard)):
            kept.append(k)
        else:
            for key in ("rows", "bad", "files"):
                shard.pop(key, None)
            shard["complete"] = False
    entries = sorted(p.name for p in out.iterdir())
    stale = [n for n in entries if _TEMP_NAME.match(n)]
    for k, shard in enumerate(old.shards):
        if k not in kept:
            stale += [n for n in shard["names"] if n in entries]
    old.status = "running"
    return _Plan(old, [k for k in range(len(ranges)) if k not in kept], kept, _deletable(out, stale, protected))


def _apply(out: Path, plan: _Plan) -> None:
    for path in plan.delete:
        path.unlink(missing_ok=True)
    if plan.resumed is not None:
        keep_errors_of(out, set(plan.resumed))
    plan.manifest.save()


def _shard_intact(out: Path, shard: dict[str, Any]) -> bool:
    files = shard.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(shard["names"]):
        return False
    for name, info in files.items():
        path = out / name
        try:
            if not path.is_file() or path.stat().st_size != info.get("size") or sha256_file(path) != info.get("sha256"):
                return False
        except OSError:
            return False
    return True


def _deletable(out: Path, names: list[str], protected: set[Path]) -> list[Path]:
    """The paths of our own files ``names`` in ``out``, each checked to be one we may remove (a
    plain file or link directly in ``out``, with one of our names, not resolving to a protected
    path); a refusal otherwise."""
    paths = []
    for name in names:
        if not (_SHARD_NAME.match(name) or _TEMP_NAME.match(name) or name in (MANIFEST, ERRORS)):
            raise OutputError(f"{out / name}: not a file engine.embed writes; not deleting it")
        path = out / name
        if path.is_dir() and not path.is_symlink():
            raise OutputError(f"{path}: is a directory; not deleting it")
        if path.resolve() in protected:
            raise OutputError(f"{path}: is one of the inputs; not deleting or overwriting it")
        paths.append(path)
    return paths
