"""Corpus inputs: which files, how each format is read as a stream, and where every shard starts.

Formats, by suffix:

- ``.txt``: one passage per non-blank line (a line of ASCII white space only is skipped); the id is
  the line number.
- ``.jsonl`` (``.ndjson``): one JSON object per non-blank line; the passage is its ``text_field``.
- ``.csv``: a header row, then one record per row (quoted fields may span lines).
- ``.parquet``: one record per row; ``text_field`` must be a string column.

Passage numbering: every record (a non-blank line, a CSV row, a Parquet row) of the inputs, in the
order the inputs are given, gets the next index 0, 1, 2... whether or not it turns out to be valid;
shard ``k`` holds the records ``[k * shard_size, (k + 1) * shard_size)``. The numbering depends on the
files alone, so a resumed job and a job whose workers failed produce exactly the same shards.

:func:`scan_corpus` makes one pass over the inputs that only finds record boundaries (no JSON is
parsed), noting where each shard's first record lies: the byte offset and line number for line
formats, the row for Parquet. :func:`iter_shard` then reads one shard from there, lazily: memory
stays bounded by one record (one Parquet batch) whatever the size of the corpus.

A record that cannot be used (malformed JSON or CSV, a missing or non-string field, an empty
passage, bytes that are not UTF-8) comes out as a :class:`Record` with ``error`` set, never as an
exception, so that the caller decides between stopping and ``--skip-bad``. Problems with a whole
file (missing, unknown format, a CSV header, the first JSONL record or a Parquet schema without
the text field, or without an id field the user named) raise :class:`InputError`.

The scan also records each file's size, modification time and sha256 (of the bytes it read, as
it reads them; Parquet files are hashed whole): :func:`check_unchanged` compares them at the end
of a job, so that a file changed while it was read never ends in "complete" output.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..format import sha256_file

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_BOM = b"\xef\xbb\xbf"
_PARQUET_BATCH = 1024  # rows decoded at a time from a Parquet row group
_GLOB_CHARS = set("*?[")

# The csv module refuses fields over 128 KiB by default; a long passage is not an error here.
csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))


class InputError(ValueError):
    """A problem with an input file as a whole (one line, naming the file)."""


@dataclass(frozen=True)
class Fields:
    """Which fields hold the passage and its id. ``id_field`` is always set (``"id"`` by default);
    ``id_explicit`` says whether the user named it (then every record must have it)."""

    text: str = "text"
    id: str = "id"
    id_explicit: bool = False


@dataclass(frozen=True)
class InputFile:
    """One input file. ``path`` is as given (or as the glob listed it); ``size``, ``mtime_ns`` and
    ``sha256`` are the file as the scan read it; ``id_mode`` is ``"field"`` (ids from the id field)
    or ``"line"`` (ids are line numbers, Parquet: row numbers)."""

    path: str
    resolved: str
    format: str
    size: int
    mtime_ns: int
    sha256: str
    records: int
    id_mode: str


@dataclass(frozen=True)
class ShardStart:
    """Where a shard's first record lies: input ``file`` (an index), the record's byte ``offset``
    and its 1-based ``line`` (line formats), or ``offset`` = its 0-based row (Parquet)."""

    file: int
    offset: int
    line: int


@dataclass(frozen=True)
class Corpus:
    """The scanned inputs: files, total records, and every shard's start."""

    files: tuple[InputFile, ...]
    records: int
    shard_size: int
    starts: tuple[ShardStart, ...]

    @property
    def num_shards(self) -> int:
        return len(self.starts)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Record indices ``[first, end)`` of shard ``k``."""
        first = k * self.shard_size
        return first, min(first + self.shard_size, self.records)

    def location(self, file: int, line: int) -> str:
        """``path:line`` (``path: row N`` for Parquet): how messages name a record."""
        f = self.files[file]
        return f"{f.path}: row {line}" if f.format == "parquet" else f"{f.path}:{line}"

    def to_dict(self) -> dict[str, Any]:
        return {"files": [asdict(f) for f in self.files], "records": self.records, "shard_size": self.shard_size,
                "starts": [asdict(s) for s in self.starts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Corpus":
        return cls(tuple(InputFile(**f) for f in data["files"]), data["records"], data["shard_size"],
                   tuple(ShardStart(**s) for s in data["starts"]))


@dataclass(frozen=True, slots=True)
class Record:
    """One record: its passage ``index``, ``id`` and ``text``, where it came from (``file`` index,
    ``line``: line number, or row number for Parquet, 1-based), and ``error`` when it is unusable
    (then ``text`` is empty)."""

    index: int
    id: str
    text: str
    file: int
    line: int
    error: str | None = None


# -- finding the inputs -----------------------------------------------------------------------------------


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """Each input as ``(path as given, resolved path)``: globs expanded (sorted), every file checked
    to exist, have a known format, and appear only once."""
    if not inputs:
        raise InputError("no input given")
    out: list[tuple[str, Path]] = []
    seen: dict[Path, str] = {}
    for item in inputs:
        text = os.fspath(item)
        if _GLOB_CHARS & set(text):
            matches = sorted(m for m in glob.glob(text, recursive=True) if os.path.isfile(m))
            if not matches:
                raise InputError(f"{text}: no file matches this pattern")
        else:
            if not os.path.exists(text):
                raise InputError(f"{text}: no such file")
            if not os.path.isfile(text):
                raise InputError(f"{text}: not a file")
            matches = [text]
        for path in matches:
            if input_format(path) is None:
                raise InputError(f"{path}: unknown input format (expected {', '.join(sorted(FORMATS))})")
            resolved = Path(path).resolve()
            if resolved in seen:
                raise InputError(f"{path}: given twice (also as {seen[resolved]})")
            seen[resolved] = path
            out.append((path, resolved))
    return out


def input_format(path: str | os.PathLike) -> str | None:
    return FORMATS.get(Path(path).suffix.lower())


# -- the scan -----------------------------------------------------------------------------------------------


def scan_corpus(inputs: Sequence[str | os.PathLike], shard_size: int, fields: Fields = Fields()) -> Corpus:
    """One pass over ``inputs`` that counts records and notes each shard's start (no parsing beyond
    record boundaries). Raises :class:`InputError` for a file-level problem or an empty corpus."""
    files: list[InputFile] = []
    starts: list[ShardStart] = []
    total = 0
    for fi, (given, resolved) in enumerate(expand_inputs(inputs)):
        fmt = input_format(given)
        try:
            stat = resolved.stat()
            if fmt == "parquet":
                rows, id_mode = _parquet_info(given, resolved, fields)
                for row in range((-total) % shard_size, rows, shard_size):
                    starts.append(ShardStart(fi, row, row + 1))
                count, sha256 = rows, sha256_file(resolved)
            else:
                id_mode = _line_fields(given, resolved, fmt, fields)
                count, digest = 0, hashlib.sha256()
                for offset, line, _ in _line_records(resolved, fmt, 0, 1, digest):
                    if (total + count) % shard_size == 0:
                        starts.append(ShardStart(fi, offset, line))
                    count += 1
                sha256 = digest.hexdigest()
        except OSError as exc:
            raise InputError(f"{given}: unreadable ({exc.strerror or exc})") from None
        files.append(InputFile(given, str(resolved), fmt, stat.st_size, stat.st_mtime_ns, sha256, count, id_mode))
        total += count
    if total == 0:
        raise InputError("the inputs hold no passages")
    return Corpus(tuple(files), total, shard_size, tuple(starts))


def _line_fields(given: str, path: Path, fmt: str, fields: Fields) -> str:
    """Ids from the id field or from line numbers: the header (CSV) or the first record (JSONL)
    decides, unless the user named the id field (then it is required). The text field, and a named
    id field, must be in the header or the first record: a file without them is refused here,
    before anything is written (a first record that is not a JSON object is a bad record)."""
    if fmt == "txt":
        return "line"
    required = (fields.text, fields.id) if fields.id_explicit else (fields.text,)
    if fmt == "csv":
        names = _csv_header(given, path)
        missing = next((n for n in required if n not in names), None)
        if missing is not None:
            raise InputError(f"{given}: no column {missing!r} in the header ({', '.join(names)})")
    else:
        first = _first_object(path)
        if first is None:
            return "field" if fields.id_explicit else "line"
        line, names = first
        missing = next((n for n in required if n not in names), None)
        if missing is not None:
            raise InputError(f"{given}:{line}: no field {missing!r} in the first record ({', '.join(names)})")
    return "field" if fields.id in names else "line"


def _first_object(path: Path) -> tuple[int, list[str]] | None:
    """The line and keys of a JSON lines file's first record, if it is a JSON object."""
    for _, line, raw in _line_records(path, "jsonl", 0, 1):
        try:
            first = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        return (line, list(first)) if isinstance(first, dict) else None
    return None


def _csv_header(given: str, path: Path) -> list[str]:
    with open(path, "rb") as f:
        for _, _, row in _csv_rows(f, 0, 1):
            if isinstance(row, str):
                raise InputError(f"{given}:1: malformed CSV header ({row})")
            if _undecodable(row):
                raise InputError(f"{given}:1: the CSV header is not valid UTF-8")
            return row
    raise InputError(f"{given}: empty CSV file (no header row)")


def _parquet_info(given: str, path: Path, fields: Fields) -> tuple[int, str]:
    pq = _pyarrow_parquet()
    import pyarrow as pa

    try:
        meta = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{given}: not a readable Parquet file ({_one_line(exc)})") from None
    schema = meta.schema_arrow
    if fields.text not in schema.names:
        raise InputError(f"{given}: no column {fields.text!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(fields.text).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{given}: column {fields.text!r} holds {kind}, not strings")
    if fields.id in schema.names:
        kind = schema.field(fields.id).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)):
            raise InputError(f"{given}: column {fields.id!r} holds {kind}; ids must be strings or integers")
        id_mode = "field"
    elif fields.id_explicit:
        raise InputError(f"{given}: no column {fields.id!r} (columns: {', '.join(schema.names)})")
    else:
        id_mode = "line"
    return meta.metadata.num_rows, id_mode


def check_unchanged(corpus: Corpus) -> None:
    """Raise :class:`InputError` naming the first input whose size, modification time or sha256
    differs from the scan's: records read from it may mix old and new text. Stats every file
    first, then hashes them (reads every byte)."""
    def changed(f: InputFile, why: str) -> InputError:
        return InputError(f"{f.path}: changed while the job ran ({why}); the shards may mix old and new text, so "
                          "the job is not complete: rerun with --force once the inputs stay as they are")

    try:
        for f in corpus.files:
            stat = os.stat(f.resolved)
            if stat.st_size != f.size:
                raise changed(f, f"{f.size:,} bytes, now {stat.st_size:,}")
            if stat.st_mtime_ns != f.mtime_ns:
                raise changed(f, "its modification time changed")
        for f in corpus.files:
            if sha256_file(Path(f.resolved)) != f.sha256:
                raise changed(f, "rewritten at the same size and modification time")
    except OSError as exc:
        raise changed(f, f"unreadable now: {exc.strerror or exc}") from None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet needs pyarrow: pip install -e .[corpus]") from None
    return pq


# -- reading a shard ----------------------------------------------------------------------------------------


def iter_shard(corpus: Corpus, k: int, fields: Fields = Fields()) -> Iterator[Record]:
    """The records of shard ``k`` in order, read lazily from the shard's start."""
    start = corpus.starts[k]
    index, end = corpus.shard_range(k)
    fi, offset, line = start.file, start.offset, start.line
    several = len(corpus.files) > 1
    while index < end:
        f = corpus.files[fi]
        records = _file_records(corpus, fi, offset, line, fields, several, index)
        try:
            for record in records:
                yield record
                index += 1
                if index == end:
                    return
        finally:
            records.close()
        fi, offset, line = fi + 1, 0, 1
        if fi == len(corpus.files) and index < end:
            raise InputError(f"{f.path}: ended before record {end} (the file changed since the scan?)")


def _file_records(
    corpus: Corpus, fi: int, offset: int, line: int, fields: Fields, several: bool, index: int,
) -> Iterator[Record]:
    f = corpus.files[fi]
    path = Path(f.resolved)

    def line_id(n: int) -> str:
        return f"{f.path}:{n}" if several else str(n)

    try:
        if f.format == "parquet":
            yield from _parquet_records(f, fi, offset, fields, line_id, index)
            return
        header = _csv_header(f.path, path) if f.format == "csv" else None
        for _, n, payload in _line_records(path, f.format, offset, line):
            if f.format == "txt":
                yield _txt_record(index, fi, n, payload, line_id)
            elif f.format == "jsonl":
                yield _json_record(index, fi, n, payload, fields, f.id_mode, line_id)
            else:
                yield _csv_record(index, fi, n, payload, header, fields, f.id_mode, line_id)
            index += 1
    except OSError as exc:
        raise InputError(f"{f.path}: unreadable ({exc.strerror or exc})") from None


def _bad(index: int, fi: int, n: int, why: str) -> Record:
    return Record(index, "", "", fi, n, why)


def _txt_record(index: int, fi: int, n: int, raw: bytes, line_id) -> Record:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _bad(index, fi, n, f"not valid UTF-8 (byte {exc.start + 1} of the line)")
    if not text.strip():
        return _bad(index, fi, n, "empty passage (white space only)")
    return Record(index, line_id(n), text, fi, n)


def _json_record(index: int, fi: int, n: int, raw: bytes, fields: Fields, id_mode: str, line_id) -> Record:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return _bad(index, fi, n, f"not valid UTF-8 (byte {exc.start + 1} of the line)")
    except ValueError as exc:
        return _bad(index, fi, n, f"malformed JSON ({_one_line(exc)})")
    if not isinstance(obj, dict):
        return _bad(index, fi, n, f"expected a JSON object, got {_json_kind(obj)}")
    return _checked(index, fi, n, obj.get(fields.text, _MISSING), obj.get(fields.id, _MISSING), fields, id_mode,
                    line_id)


def _csv_record(
    index: int, fi: int, n: int, row: list[str] | str, header: list[str], fields: Fields, id_mode: str, line_id,
) -> Record:
    if isinstance(row, str):
        return _bad(index, fi, n, f"malformed CSV ({row})")
    if len(row) != len(header):
        return _bad(index, fi, n, f"expected {len(header)} fields as in the header, got {len(row)}")
    if _undecodable(row):
        return _bad(index, fi, n, "not valid UTF-8")
    values = dict(zip(header, row))
    return _checked(index, fi, n, values.get(fields.text, _MISSING), values.get(fields.id, _MISSING), fields,
                    id_mode, line_id)


def _parquet_records(f: InputFile, fi: int, row: int, fields: Fields, line_id, index: int) -> Iterator[Record]:
    pq = _pyarrow_parquet()
    # pre_buffer (pyarrow's default) would read every remaining row group into memory at once.
    pfile = pq.ParquetFile(f.resolved, pre_buffer=False)
    meta = pfile.metadata
    group, first = 0, 0  # the row group holding ``row``, and that group's first row
    while group < meta.num_row_groups and first + meta.row_group(group).num_rows <= row:
        first += meta.row_group(group).num_rows
        group += 1
    columns = [fields.text] + ([fields.id] if f.id_mode == "field" else [])
    skip = row - first
    n = first
    for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH, row_groups=range(group, meta.num_row_groups),
                                    columns=columns, use_threads=False):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if f.id_mode == "field" else None
        for j, text in enumerate(texts):
            n += 1
            if skip:
                skip -= 1
                continue
            raw_id = ids[j] if ids is not None else _MISSING
            yield _checked(index, fi, n, _MISSING if text is None else text, raw_id, fields, f.id_mode, line_id,
                           null_text=text is None)
            index += 1


_MISSING = object()


def _checked(
    index: int, fi: int, n: int, text: Any, raw_id: Any, fields: Fields, id_mode: str, line_id,
    null_text: bool = False,
) -> Record:
    """A record from a structured row: the text field present, a string, not empty; the id a
    string or an integer (when ids come from the field)."""
    if null_text:
        return _bad(index, fi, n, f"field {fields.text!r} is null")
    if text is _MISSING:
        return _bad(index, fi, n, f"missing field {fields.text!r}")
    if not isinstance(text, str):
        return _bad(index, fi, n, f"field {fields.text!r} must be a string, got {_json_kind(text)}")
    if not text.strip():
        return _bad(index, fi, n, "empty passage (white space only)" if text else "empty passage")
    if id_mode == "line":
        return Record(index, line_id(n), text, fi, n)
    if raw_id is _MISSING or raw_id is None:
        return _bad(index, fi, n, f"missing field {fields.id!r}" if raw_id is _MISSING else f"field {fields.id!r} is null")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return _bad(index, fi, n, f"field {fields.id!r} must be a string or an integer, got {_json_kind(raw_id)}")
    if raw_id == "":
        return _bad(index, fi, n, f"field {fields.id!r} is empty")
    return Record(index, str(raw_id), text, fi, n)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


# -- record boundaries of the line formats ------------------------------------------------------------------


def _line_records(
    path: Path, fmt: str, offset: int, line: int, digest: Any = None,
) -> Iterator[tuple[int, int, Any]]:
    """``(byte offset, line number, payload)`` of each record from byte ``offset``, where line
    ``line`` (1-based) starts. Payloads: the line's bytes without its end (txt, jsonl; blank lines
    skipped), or a CSV row's fields (a string saying why for a malformed row; from offset 0 the
    header row is skipped). A UTF-8 byte-order mark at the start of a file is dropped. ``digest``
    (a hashlib object) is updated with every byte read, blank lines included."""
    with open(path, "rb") as f:
        if fmt == "csv":
            rows = _csv_rows(f, offset, line, digest)
            if offset == 0:
                next(rows, None)  # the header
            yield from rows
            return
        f.seek(offset)
        n, pos = line - 1, offset
        for raw in f:
            if digest is not None:
                digest.update(raw)
            start = pos
            pos += len(raw)
            n += 1
            if start == 0 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if raw.endswith(b"\n"):
                raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
            if raw.strip():
                yield start, n, raw


def _csv_rows(f, offset: int, line: int, digest: Any = None) -> Iterator[tuple[int, int, list[str] | str]]:
    """Non-blank CSV rows from byte ``offset`` (where line ``line`` starts) with each row's byte
    offset and first line. The csv module pulls one physical line at a time and never reads ahead,
    so the bytes handed to it so far end exactly where the current row ends: that gives the offsets.
    Undecodable bytes pass through as surrogates (the record is refused later), so row boundaries
    never depend on the encoding. A malformed row comes out as a string saying why."""
    f.seek(offset)
    state = [offset, line - 1]  # bytes handed out, lines handed out

    def lines() -> Iterator[str]:
        for raw in f:
            if digest is not None:
                digest.update(raw)
            at_start = state[0] == 0
            state[0] += len(raw)
            state[1] += 1
            if at_start and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            yield raw.decode("utf-8", "surrogateescape")

    reader = csv.reader(lines(), strict=True)
    while True:
        start, start_line = state[0], state[1] + 1
        try:
            row: list[str] | str = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            row = _one_line(exc)
        if row != []:  # [] is a blank line
            yield start, start_line, row


def _undecodable(values: list[str]) -> bool:
    """Whether a CSV row decoded with ``surrogateescape`` held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for value in values for ch in value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
