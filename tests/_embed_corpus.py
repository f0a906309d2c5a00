"""Corpora in every input format for the engine.embed tests, and readers of its output written
with pyarrow / numpy / json alone (no engine.embed code), so the tests check the files themselves.

Each builder returns ``(path, expected)`` where ``expected`` is the list of ``(id, text)`` the
command must produce, in order: ids and texts are derived here from how the file was written.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from converters.tiny_models import sample_sentences

_ENGINES: list[Path] = []


def tiny_engine(tmp_path_factory) -> Path:
    """A tiny random Llama engine (hidden 64, 2 layers), built once per test session."""
    if not _ENGINES:
        from converters.convert import convert
        from converters.tiny_models import save_tiny_checkpoint

        root = tmp_path_factory.mktemp("embed-engine")
        src = save_tiny_checkpoint(root / "hf", "llama", num_layers=2)
        _ENGINES.append(convert(src, root / "engine", quiet=True))
    return _ENGINES[0]


def passages(n: int, seed: int, newlines: bool) -> list[str]:
    """Short passages with the awkward cases: non-ASCII text, quotes and commas, leading spaces and
    (where the format allows) line breaks inside a passage."""
    out = []
    for i, text in enumerate(sample_sentences(n, seed=seed, min_words=2, max_words=12)):
        if i % 7 == 3:
            text = f"{text} café naïve 漢字 ü"
        if i % 11 == 5:
            text = f'He said "hi, there", then {text}'
        if i % 17 == 9:
            text = "  " + text
        if newlines and i % 13 == 6:
            text = f"{text}\nsecond line,\r\n third"
        out.append(text)
    return out


def write_txt(path: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """One passage per line, with blank and white-space lines between (skipped, but counted in the
    line numbers that are the ids) and a byte-order mark; CRLF line ends on some lines."""
    expected, lines = [], []
    for i, text in enumerate(passages(n, seed, newlines=False)):
        if i % 50 == 10:
            lines.append("")
        if i % 50 == 30:
            lines.append("  \t ")
        lines.append(text + ("\r" if i % 9 == 4 else ""))
        expected.append((str(len(lines)), text))
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8"))
    return expected


def write_jsonl(path: Path, n: int, seed: int = 1) -> list[tuple[str, str]]:
    expected = []
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(passages(n, seed, newlines=True)):
            if i % 40 == 20:
                f.write("\n")
            f.write(json.dumps({"id": f"j{i}", "text": text, "extra": [i, None]}, ensure_ascii=i % 2 == 0) + "\n")
            expected.append((f"j{i}", text))
    return expected


def write_csv(path: Path, n: int, seed: int = 2) -> list[tuple[str, str]]:
    expected = []
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "title", "text"])
        for i, text in enumerate(passages(n, seed, newlines=True)):
            w.writerow([f"c{i}", f"title {i}, quoted", text])
            expected.append((f"c{i}", text))
    return expected


def write_parquet(path: Path, n: int, seed: int = 3, row_group: int = 170) -> list[tuple[str, str]]:
    """Integer ids (written as strings), several row groups so shards start inside one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = passages(n, seed, newlines=True)
    ids = [1000 + 3 * i for i in range(n)]
    table = pa.table({"text": pa.array(texts, pa.string()), "id": pa.array(ids, pa.int64())})
    pq.write_table(table, path, row_group_size=row_group)
    return [(str(i), t) for i, t in zip(ids, texts)]


WRITERS = {"txt": write_txt, "jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}


def read_output(out: Path) -> tuple[list[str], np.ndarray, dict]:
    """All rows of a finished output directory, shard by shard as the manifest lists them:
    ``(ids, embeddings [rows, hidden], manifest)``."""
    manifest = json.loads((out / "manifest.json").read_text())
    ids: list[str] = []
    rows = []
    for shard in manifest["shards"]:
        names = shard["names"]
        if names[0].endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(out / names[0])
            ids += table.column("id").to_pylist()
            emb = table.column("embedding").combine_chunks()
            width = emb.type.list_size
            rows.append(emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, width))
        else:
            ids += [json.loads(line) for line in (out / names[0]).read_text(encoding="utf-8").splitlines()]
            rows.append(np.load(out / names[1]))
    return ids, np.concatenate(rows), manifest


def relative_error(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Per row: ||actual - expected|| / ||expected||, in float64."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    return np.linalg.norm(a - e, axis=1) / np.linalg.norm(e, axis=1)
