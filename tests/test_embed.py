"""python -m engine.embed on one machine, without Ray: formats, parity with Engine.encode, resume
after SIGKILL, bad input, the output-directory policy, bounded memory.

The reference for every embedding is ``Engine.encode`` of the same passages (rows do not depend on
their batch neighbours); output files are read back with pyarrow / numpy alone.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from _embed_corpus import WRITERS, read_output, relative_error, tiny_engine, write_txt
from engine import Engine
from engine.embed.cli import main
from engine.embed.embedder import Embedded
from engine.embed import output
from engine.embed.job import ShardSink
from engine.embed.local import prefetched
from engine.embed.output import Manifest, NpyShardWriter
from engine.embed.readers import Fields, iter_shard, scan_corpus

REPO = Path(__file__).resolve().parents[1]
N_FORMAT = 500  # passages per input file


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    return tiny_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(engine_dir) -> Engine:
    return Engine.from_pretrained(engine_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, list[tuple[str, str]]]]:
    root = tmp_path_factory.mktemp("embed-corpus")
    return {fmt: (root / f"part.{fmt}", write(root / f"part.{fmt}", N_FORMAT)) for fmt, write in WRITERS.items()}


@pytest.fixture(scope="module")
def reference(engine, corpus):
    """text -> Engine.encode row, for every passage of the corpus."""
    texts = sorted({t for _, expected in corpus.values() for _, t in expected})
    rows = engine.encode(texts, convert_to_numpy=True)
    return dict(zip(texts, rows))


def run(*args, capsys=None) -> tuple[int, str]:
    code = main([str(a) for a in args] + ["--quiet"])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_output(out: Path, expected: list[tuple[str, str]], reference: dict, tol: float = 1e-6) -> dict:
    """Every expected passage exactly once, in order, with the reference embedding; the manifest's
    shard records match the files."""
    ids, emb, manifest = read_output(out)
    assert manifest["status"] == "complete"
    assert ids == [i for i, _ in expected]
    want = np.stack([reference[t] for _, t in expected])
    err = relative_error(emb, want)
    assert err.max() <= tol, f"max relative error {err.max():.3g} at row {err.argmax()}"
    for shard in manifest["shards"]:
        assert shard["complete"]
        for name, info in shard["files"].items():
            assert sha256(out / name) == info["sha256"] and (out / name).stat().st_size == info["size"]
    assert sum(s["rows"] for s in manifest["shards"]) == len(expected)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    return manifest


# -- formats and parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_matches_encode(tmp_path, engine_dir, corpus, reference, fmt, capsys):
    path, expected = corpus[fmt]
    code, err = run(engine_dir, path, "--out", tmp_path / "out", "--shard-size", 97, capsys=capsys)
    assert code == 0, err
    manifest = check_output(tmp_path / "out", expected, reference)
    assert [s["records"] for s in manifest["shards"]] == [97] * 5 + [N_FORMAT - 5 * 97]
    assert manifest["job"]["inputs"][0]["records"] == N_FORMAT


def test_glob_over_all_formats_npy_float16(tmp_path, engine_dir, corpus, reference, capsys):
    """A glob reads the files in sorted order, shards cross file boundaries, line-number ids name
    their file when several inputs are read; float16 .npy output is the reference rounded."""
    root = corpus["txt"][0].parent
    files = sorted(root.glob("part.*"))
    expected = []
    for f in files:
        rows = corpus[f.suffix[1:]][1]
        expected += [(f"{f}:{i}" if f.suffix == ".txt" else i, t) for i, t in rows]
    code, err = run(engine_dir, f"{root}/part.*", "--out", tmp_path / "out", "--shard-size", 700, "--format", "npy",
                    "--output-dtype", "float16", capsys=capsys)
    assert code == 0, err
    ids, emb, manifest = read_output(tmp_path / "out")
    assert emb.dtype == np.float16 and ids == [i for i, _ in expected]
    want = np.stack([reference[t] for _, t in expected])
    # float16 keeps 11 significant bits: at most half a unit in the last place away, plus slack for
    # the reference's own last-bit difference.
    assert np.all(np.abs(emb.astype(np.float32) - want) <= np.abs(want) * 2.0 ** -10 + 1e-7)
    assert [s["records"] for s in manifest["shards"]] == [700, 700, 600]


def test_instruction_and_normalize_match_encode(tmp_path, engine_dir, engine, corpus, capsys):
    path, expected = corpus["jsonl"]
    code, err = run(engine_dir, path, "--out", tmp_path / "out", "--instruction", "Retrieve a passage",
                    "--normalize", "--dtype", "float32", capsys=capsys)
    assert code == 0, err
    ids, emb, manifest = read_output(tmp_path / "out")
    want = engine.encode([("Retrieve a passage", t) for _, t in expected], normalize=True, convert_to_numpy=True)
    assert ids == [i for i, _ in expected] and relative_error(emb, want).max() <= 1e-6
    assert manifest["job"]["options"]["normalize"] is True
    assert manifest["job"]["options"]["instruction"] == "Retrieve a passage"


def test_prefetch_thread_gives_the_same_rows(tmp_path, engine_dir, corpus, reference):
    """The CUDA path's reader thread (forced on here) changes nothing in the output."""
    from engine.embed.local import run_local

    path, expected = corpus["csv"]
    plan = scan_corpus([path], 250)
    load = {"device": "cpu", "dtype": "float32", "max_length": 512}
    embed = {"prompt": None, "instruction": None, "normalize": False, "batch_size": 64, "max_batch_tokens": 16384,
             "output_dtype": "float32"}
    chunks = list(run_local(engine_dir, plan, Fields(), [0, 1], load, embed, prefetch=True, chunk=100))
    assert np.concatenate([c.index for c in chunks]).tolist() == list(range(N_FORMAT))
    emb = np.concatenate([c.embeddings for c in chunks])
    assert relative_error(emb, np.stack([reference[t] for _, t in expected])).max() <= 1e-6


def test_prefetched_raises_producer_errors_and_stops_early():
    def items():
        yield 1
        yield 2
        raise ValueError("bad record in the reader")

    got = []
    with pytest.raises(ValueError, match="bad record in the reader"):
        for x in prefetched(items(), depth=1):
            got.append(x)
    assert got == [1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # joins the producer thread: it must have stopped, at most depth + 2 ahead
    assert len(produced) <= 3 + 2 + 1


def test_parquet_embeddings_are_stored_plain(tmp_path, engine_dir, corpus, capsys):
    """The embedding column is written plain (pyarrow's default dictionary encoding stored random
    floats in 1.5x their size): the file is close to rows * hidden * 4 bytes."""
    import pyarrow.parquet as pq

    path, expected = corpus["txt"]
    code, err = run(engine_dir, path, "--out", tmp_path / "out", capsys=capsys)
    assert code == 0, err
    shard = tmp_path / "out" / "shard-00000.parquet"
    meta = pq.ParquetFile(shard).metadata
    hidden = pq.read_schema(shard).field("embedding").type.list_size
    for g in range(meta.num_row_groups):
        chunk = meta.row_group(g).column(1)
        assert chunk.path_in_schema.startswith("embedding.")
        assert not chunk.has_dictionary_page and "PLAIN" in chunk.encodings, chunk.encodings
        assert not {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(chunk.encodings), chunk.encodings
    raw = len(expected) * hidden * 4
    assert meta.num_rows == len(expected) and shard.stat().st_size < 1.15 * raw, shard.stat().st_size / raw


# -- resume after SIGKILL -------------------------------------------------------------------------------


def _cli(args: list, out: Path, check_no_ray: bool = False) -> subprocess.Popen:
    """``python -m engine.embed ARGS --out OUT --quiet`` in a fresh interpreter; ``check_no_ray``
    runs it through runpy and then fails unless the job left 'ray' out of sys.modules."""
    argv = ["engine.embed", *map(str, args), "--out", str(out), "--quiet"]
    code = (f"import runpy, sys\nsys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('engine.embed', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, f'exit status {exc.code}'\n"
            "assert 'ray' not in sys.modules, 'ray was imported by a local job'\n")
    cmd = [sys.executable, "-c", code] if check_no_ray else [sys.executable, "-m", *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE,
                            text=True)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, engine_dir, capsys):
    """A job killed (SIGKILL) once 3 shards are complete, then ``--resume``: the output is
    byte-identical to an uninterrupted run's, and the complete shards were not recomputed. The
    uninterrupted run, in its own interpreter beside it, also shows that a job without --workers /
    --ray never imports Ray."""
    path = tmp_path / "big.txt"
    write_txt(path, 900, seed=5)
    args = [engine_dir, path, "--shard-size", 60, "--batch-size", 32]
    out, straight = tmp_path / "killed", tmp_path / "straight"
    reference = _cli(args, straight, check_no_ray=True)
    proc = _cli(args, out)
    complete: list[int] = []
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                shards = json.loads((out / "manifest.json").read_text())["shards"]
            except (OSError, ValueError):
                shards = []
            complete = [s["index"] for s in shards if s["complete"]]
            if len(complete) >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and len(complete) < 3:
            proc.kill()
        proc.wait(timeout=60)
        reference.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"the job ended before it could be killed: {proc.stderr.read()[-500:]}"
    assert reference.returncode == 0, reference.stderr.read()[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    done = [s for s in manifest["shards"] if s["complete"]]
    assert manifest["status"] == "running" and 3 <= len(done) < 15
    # Nothing half-written passes for complete: every complete shard's file is intact.
    stat = {s["names"][0]: (out / s["names"][0]).stat() for s in done}
    for s in done:
        assert sha256(out / s["names"][0]) == s["files"][s["names"][0]]["sha256"]

    code, err = run(*args, "--out", out, "--resume", capsys=capsys)
    assert code == 0, err
    resumed, uninterrupted = Manifest.read(out), Manifest.read(straight)
    assert resumed.status == "complete" and resumed.summary["shards_kept"] == len(done)
    assert resumed.summary["records"] == 900 - 60 * len(done)  # only the rest was embedded again
    for name, before in stat.items():  # the complete shards were not rewritten
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    for a, b in zip(resumed.shards, uninterrupted.shards):  # byte-identical output
        assert a["files"] == b["files"]
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    # Resuming a complete job does nothing.
    code, err = run(*args, "--out", out, "--resume", capsys=capsys)
    assert code == 0 and Manifest.read(out).summary["shards_written"] == 0


# -- bad input ------------------------------------------------------------------------------------------


BAD_CASES = {
    "malformed-json": ("c.jsonl", b'{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n', "c.jsonl:3: malformed JSON"),
    "missing-field": ("c.jsonl", b'{"text": "ok"}\n\n{"body": "no text"}\n', "c.jsonl:3: missing field 'text'"),
    "empty-passage": ("c.jsonl", b'{"text": "ok"}\n{"text": "   "}\n', "c.jsonl:2: empty passage"),
    "not-a-string": ("c.jsonl", b'{"text": "ok"}\n{"text": 17}\n', "c.jsonl:2: field 'text' must be a string"),
    "not-an-object": ("c.jsonl", b'{"text": "ok"}\n[1, 2]\n', "c.jsonl:2: expected a JSON object"),
    "bad-utf8-txt": ("c.txt", b"fine\n\nok \xff\xfe here\n", "c.txt:3: not valid UTF-8"),
    "csv-field-count": ("c.csv", b'id,text\n1,"ok"\n2,"a","b"\n', "c.csv:3: expected 2 fields"),
    "csv-empty-id": ("c.csv", b"text,id\nok,7\nfine,\n", "c.csv:3: field 'id' is empty"),
}

def test_sigterm_exits_143_keeps_the_complete_shards_and_advises_resume(tmp_path, engine_dir, engine, capsys,
                                                                        monkeypatch):
    """A real SIGTERM to this process once the second shard is being filled: exit status 143, the
    same one line as Ctrl-C, the first shard kept complete, and ``--resume`` finishes the job."""
    path = tmp_path / "corpus.txt"
    expected = write_txt(path, 180, seed=3)
    real_add, calls = ShardSink.add, []

    def add(self, chunk):
        calls.append(len(chunk.ids))
        if sum(calls[:-1]) >= 60:  # shard 0 ([0, 60)) is written: stop inside shard 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real_add(self, chunk)

    monkeypatch.setattr(ShardSink, "add", add)
    out = tmp_path / "out"
    code, err = run(engine_dir, path, "--out", out, "--shard-size", 60, "--batch-size", 16, capsys=capsys)
    assert code == 143, err
    assert err.strip() == "engine.embed: interrupted by SIGTERM; the complete shards are kept: rerun with --resume"
    manifest = Manifest.read(out)
    assert manifest.status == "running" and [s["complete"] for s in manifest.shards][:1] == [True]
    monkeypatch.setattr(ShardSink, "add", real_add)
    code, err = run(engine_dir, path, "--out", out, "--shard-size", 60, "--batch-size", 16, "--resume", capsys=capsys)
    assert code == 0, err
    texts = [t for _, t in expected]
    check_output(out, expected, dict(zip(texts, engine.encode(texts, convert_to_numpy=True))))



@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_stops_with_one_line(tmp_path, engine_dir, case, capsys):
    name, data, message = BAD_CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    code, err = run(engine_dir, path, "--out", tmp_path / "out", capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and str(path) in lines[0], err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "running" and not any(s["complete"] for s in manifest["shards"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "manifest.json"]


MISSING_COLUMN = {
    "csv": ("c.csv", b"id,body\n1,first\n2,second\n", [], "no column 'text' in the header (id, body)"),
    "jsonl": ("c.jsonl", b'{"id": "a", "body": "first"}\n{"text": "second"}\n', [],
              "c.jsonl:1: no field 'text' in the first record (id, body)"),
    "jsonl-id": ("c.jsonl", b'\n{"text": "first"}\n{"text": "second", "key": "b"}\n', ["--id-field", "key"],
                 "c.jsonl:2: no field 'key' in the first record (text)"),
    "parquet": ("c.parquet", None, [], "no column 'text' (columns: body)"),
}


@pytest.mark.parametrize("skip_bad", [False, True], ids=["stop", "skip-bad"])
@pytest.mark.parametrize("case", sorted(MISSING_COLUMN))
def test_missing_text_column_is_refused_before_anything_is_written(tmp_path, engine_dir, case, skip_bad, capsys):
    """A CSV header, a JSONL file's first record or a Parquet schema without the text field (or
    without a named --id-field) is refused up front, --skip-bad or not: one line, no DIR."""
    name, data, flags, message = MISSING_COLUMN[case]
    path = tmp_path / name
    if data is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["first", "second"]}), path)
    else:
        path.write_bytes(data)
    out = tmp_path / "out"
    code, err = run(engine_dir, path, "--out", out, *flags, *(["--skip-bad"] if skip_bad else []), capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and str(path) in lines[0], err
    assert not out.exists()


def test_skip_bad_never_completes_a_job_of_bad_records_only(tmp_path, engine_dir, capsys):
    """--skip-bad over records that are all bad: listed in errors.jsonl, but the job ends with one
    line and exit 2, never as complete."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "   "}\n{"text": 17}\n{"body": "no text"}\n{"text": ""}\n')
    out = tmp_path / "out"
    code, err = run(engine_dir, path, "--out", out, "--shard-size", 3, "--skip-bad", capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "all 4 records" in lines[0] and "errors.jsonl" in lines[0], err
    assert Manifest.read(out).status == "running"
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [1, 2, 3, 4]
    # A resume fails the same way; it does not turn the empty shards into a complete job.
    code, err = run(engine_dir, path, "--out", out, "--shard-size", 3, "--skip-bad", "--resume", capsys=capsys)
    assert code == 2 and "all 4 records" in err and Manifest.read(out).status == "running"


def _rewrite_same_size(path: Path) -> None:
    """Change the last passages' letters, keeping the size and the modification time."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 60, len(data)):
        if 97 <= data[i] <= 122:  # a-z
            data[i] = 97 + (data[i] - 97 + 1) % 26
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("change", ["appended", "rewritten"])
def test_input_changed_during_the_job_is_not_complete(tmp_path, engine_dir, capsys, monkeypatch, change):
    """An input appended to, or rewritten at the same size and time, once the first shard is
    embedded: the job ends with one line naming the file and exit 2, not "complete"; --resume
    refuses (the inputs differ from the recorded ones) and --force starts over."""
    path = tmp_path / "corpus.txt"
    expected = write_txt(path, 60, seed=7)
    real_add, calls = ShardSink.add, []

    def add(self, chunk):
        real_add(self, chunk)
        calls.append(len(chunk.ids))
        if len(calls) == 1:  # the first chunk (shard 0) is in: change the file
            if change == "appended":
                with open(path, "a", encoding="utf-8") as f:
                    f.write("one more passage\n")
            else:
                _rewrite_same_size(path)

    monkeypatch.setattr(ShardSink, "add", add)
    out, args = tmp_path / "out", [engine_dir, path, "--shard-size", 20]
    code, err = run(*args, "--out", out, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"{path}: changed while the job ran" in lines[0] and "--force" in lines[0], err
    assert Manifest.read(out).status == "running"
    monkeypatch.setattr(ShardSink, "add", real_add)
    code, err = run(*args, "--out", out, "--resume", capsys=capsys)
    assert code == 2 and "cannot resume" in err and "inputs[0]" in err, err
    code, err = run(*args, "--out", out, "--force", capsys=capsys)
    assert code == 0, err
    manifest = Manifest.read(out)
    assert manifest.status == "complete"
    assert manifest.summary["passages"] == len(expected) + (change == "appended")


def test_bad_parquet_rows_and_skip_bad(tmp_path, engine_dir, engine, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    texts = ["first passage", None, "third passage", "", "fifth passage"]
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path)
    code, err = run(engine_dir, path, "--out", tmp_path / "stop", capsys=capsys)
    assert code == 2 and f"{path}: row 2: field 'text' is null" in err and len(err.strip().splitlines()) == 1

    # --skip-bad: the bad rows go to errors.jsonl, the rest is embedded; resuming with --skip-bad
    # the job that stopped is allowed (skip_bad does not change the good rows).
    code, err = run(engine_dir, path, "--out", tmp_path / "stop", "--resume", "--skip-bad", capsys=capsys)
    assert code == 0, err
    ids, emb, manifest = read_output(tmp_path / "stop")
    assert ids == ["1", "3", "5"]
    want = engine.encode(["first passage", "third passage", "fifth passage"], convert_to_numpy=True)
    assert relative_error(emb, want).max() <= 1e-6
    errors = [json.loads(line) for line in (tmp_path / "stop" / "errors.jsonl").read_text().splitlines()]
    assert [(e["index"], e["line"], e["file"]) for e in errors] == [(1, 2, str(path)), (3, 4, str(path))]
    assert "null" in errors[0]["error"] and "empty passage" in errors[1]["error"]
    assert manifest["shards"][0]["bad"] == 2 and manifest["summary"]["bad"] == 2


def test_bad_options_and_files_are_one_line(tmp_path, engine_dir, corpus, capsys):
    path, _ = corpus["txt"]
    cases = [
        ([engine_dir, tmp_path / "missing.txt"], "missing.txt: no such file"),
        ([engine_dir, tmp_path / "*.jsonl"], "no file matches"),
        ([engine_dir, path, path], "given twice"),
        ([tmp_path, path], "engine_config.json"),
        ([engine_dir, path, "--prompt-name", "query"], "unknown prompt"),
        ([engine_dir, path, "--max-length", "100000"], "max_position_embeddings"),
        ([engine_dir, path, "--shard-size", "0"], "shard-size=0"),
        ([engine_dir, path, "--device", "gpu"], "--device='gpu'"),
    ]
    (tmp_path / "notes.md").write_text("x")
    cases.append(([engine_dir, tmp_path / "notes.md"], "unknown input format"))
    for args, message in cases:
        code, err = run(*args, "--out", tmp_path / "out", capsys=capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args, err)
    assert not (tmp_path / "out").exists()
    code, err = run(engine_dir, path, "--out", tmp_path / "out", "--resume", "--force", capsys=capsys)
    assert code == 2 and "not allowed with argument" in err


# -- the output directory -------------------------------------------------------------------------------


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != ".lock"}


def test_existing_directory_is_refused_and_kept(tmp_path, engine_dir, corpus, capsys):
    path, _ = corpus["txt"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = snapshot(foreign)
    code, err = run(engine_dir, path, "--out", foreign, capsys=capsys)
    assert code == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
    assert snapshot(foreign) == before

    # A foreign file with one of our names: --force refuses and leaves it alone.
    (foreign / "shard-00000.parquet").write_bytes(b"not ours")
    before = snapshot(foreign)
    code, err = run(engine_dir, path, "--out", foreign, "--force", capsys=capsys)
    assert code == 2 and "not written by an engine.embed job" in err
    assert snapshot(foreign) == before

    # An earlier job: refused without a flag; --force replaces only its own files.
    job = tmp_path / "job"
    assert run(engine_dir, path, "--out", job, "--shard-size", 250)[0] == 0
    first = snapshot(job)
    (job / "notes.txt").write_text("mine")
    code, err = run(engine_dir, path, "--out", job, capsys=capsys)
    assert code == 2 and "--resume" in err and snapshot(job) == {**first, "notes.txt": b"mine"}
    code, err = run(engine_dir, path, "--out", job, "--shard-size", 400, "--force", capsys=capsys)
    assert code == 0, err
    after = snapshot(job)
    assert after["notes.txt"] == b"mine" and "shard-00002.parquet" not in after  # 3 shards -> 2
    assert sorted(after) == ["manifest.json", "notes.txt", "shard-00000.parquet", "shard-00001.parquet"]

    # A resume whose options differ is refused, naming the difference; nothing changes.
    code, err = run(engine_dir, path, "--out", job, "--shard-size", 400, "--normalize", "--resume", capsys=capsys)
    assert code == 2 and "normalize: false -> true" in err and snapshot(job) == after


def tree(path: Path) -> dict[str, tuple[bool, int, int]]:
    """``path`` and everything under it: relative name -> (is a directory, size, mtime in ns)."""
    out = {}
    for p in [path, *sorted(path.rglob("*"))]:
        st = p.lstat()
        out[str(p.relative_to(path))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def test_a_refused_run_changes_nothing(tmp_path, engine_dir, corpus, capsys):
    """Every refusal of an existing DIR leaves it as it was: names, sizes and modification times
    of DIR and everything in it (no .lock file left behind either)."""
    path, _ = corpus["txt"]
    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "sub" / "data.bin").write_bytes(b"1234")
    job = tmp_path / "job"
    assert run(engine_dir, path, "--out", job, "--shard-size", 250)[0] == 0
    time.sleep(0.05)  # later changes get later times than the setup
    cases = [
        (foreign, [], "not empty"),
        (foreign, ["--resume"], "nothing to resume"),
        (job, [], "holds an earlier embedding job"),
        (job, ["--resume", "--normalize"], "normalize: false -> true"),
    ]
    for out, flags, message in cases:
        before = tree(out)
        code, err = run(engine_dir, path, "--out", out, "--shard-size", 250, *flags, capsys=capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert tree(out) == before, (out, flags)
    (foreign / "shard-00000.parquet").write_bytes(b"not ours")
    before = tree(foreign)
    code, err = run(engine_dir, path, "--out", foreign, "--force", capsys=capsys)
    assert code == 2 and "not written by an engine.embed job" in err and tree(foreign) == before
    # Another job holding the lock: refused, nothing touched.
    before = tree(job)
    fd = os.open(job / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run(engine_dir, path, "--out", job, "--shard-size", 250, "--resume", capsys=capsys)
    finally:
        os.close(fd)
    assert code == 2 and "another engine.embed job" in err and tree(job) == before


def test_resume_refuses_changed_inputs(tmp_path, engine_dir, capsys):
    path = tmp_path / "small.txt"
    write_txt(path, 40)
    out = tmp_path / "out"
    assert run(engine_dir, path, "--out", out, "--shard-size", 16)[0] == 0
    before = snapshot(out)
    with open(path, "a") as f:
        f.write("one more passage\n")
    code, err = run(engine_dir, path, "--out", out, "--shard-size", 16, "--resume", capsys=capsys)
    assert code == 2 and "inputs[0]" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_force_never_deletes_an_input_or_touches_the_engine(tmp_path, engine_dir, corpus, capsys):
    path, _ = corpus["txt"]
    out = tmp_path / "out"
    assert run(engine_dir, path, "--out", out)[0] == 0
    shard = out / "shard-00000.parquet"
    before = shard.read_bytes()
    # Our own earlier shard given as the input (its id column read as text): --force would delete it.
    code, err = run(engine_dir, shard, "--text-field", "id", "--out", out, "--force", capsys=capsys)
    assert code == 2 and "is one of the inputs" in err and shard.read_bytes() == before
    engine_files = snapshot(engine_dir)
    for target in (engine_dir, engine_dir / "sub"):
        code, err = run(engine_dir, path, "--out", target, "--force", capsys=capsys)
        assert code == 2 and "engine directory" in err
    assert snapshot(engine_dir) == engine_files and not (engine_dir / "sub").exists()


# -- a full disk ----------------------------------------------------------------------------------------


class FullDisk:
    """Files on a disk with ``room`` bytes left: a write past it writes what fits, then fails with
    ENOSPC (``message``, as the writing library words it), and so does a close that flushes
    buffered bytes. :meth:`open` stands in for ``open``; ``room = 0`` fills the disk at once."""

    def __init__(self, room: int, message: str = "No space left on device") -> None:
        self.room, self.message = room, message

    def open(self, path, mode="r", buffering=-1, encoding=None, **kwargs):
        if not set(mode) & set("wax+"):
            return open(path, mode, buffering, encoding, **kwargs)
        buffered = io.BufferedWriter(_FullDiskFile(self, open(path, mode.replace("t", "").replace("b", "") + "b", 0)))
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding=encoding, **kwargs)


class _FullDiskFile(io.RawIOBase):
    def __init__(self, disk: FullDisk, raw) -> None:
        self.disk, self.raw = disk, raw

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.raw.seek(pos, whence)

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, data) -> int:
        if self.disk.room <= 0:
            raise OSError(errno.ENOSPC, self.disk.message)
        n = min(len(data), self.disk.room)
        self.disk.room -= n
        return self.raw.write(bytes(data[:n]))

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.raw.close()


def _full_disk_parquet_writer(disk: FullDisk):
    """pyarrow's ParquetWriter writing through ``disk``."""
    import pyarrow.parquet as pq

    class Writer(pq.ParquetWriter):
        def __init__(self, where, schema, **kwargs) -> None:
            self._file = disk.open(where, "wb")
            super().__init__(self._file, schema, **kwargs)

        def close(self) -> None:
            try:
                super().close()
            finally:
                self._file.close()

    return Writer


def test_npy_abort_removes_every_temporary_when_a_close_fails(tmp_path, monkeypatch):
    """Aborting a shard when the disk is full: both closes fail (their buffered bytes do not fit),
    both temporaries go, and the abort itself raises nothing over the error that caused it."""
    disk = FullDisk(1 << 20)
    monkeypatch.setattr(output, "open", disk.open, raising=False)
    writer = NpyShardWriter(tmp_path, 0, 4, np.dtype(np.float32))
    writer.write(["a", "b"], np.ones((2, 4), np.float32))
    assert len(list(tmp_path.iterdir())) == 2
    disk.room = 0
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_full_disk_is_one_line_and_resume_finishes(tmp_path, engine_dir, engine, monkeypatch, capsys, fmt):
    """The disk fills up in the last of four shards: one line naming DIR and the full disk, exit 2, no
    temporary left, the complete shards kept; once there is room, --resume finishes the job."""
    path = tmp_path / "corpus.txt"
    expected = write_txt(path, 100, seed=9)
    out = tmp_path / "out"
    args = [engine_dir, path, "--out", out, "--shard-size", 25, "--format", fmt]
    # Room for the manifests and three shards of 25 x 64 float32 rows (6.4 KB each), not four.
    if fmt == "parquet":
        disk = FullDisk(35_000, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        import pyarrow.parquet as pq

        monkeypatch.setattr(pq, "ParquetWriter", _full_disk_parquet_writer(disk))
    else:
        disk = FullDisk(35_000)
    monkeypatch.setattr(output, "open", disk.open, raising=False)
    code, err = run(*args, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"no space left on device writing {out}" in lines[0] and "--resume" in lines[0], err
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    manifest = Manifest.read(out)
    done = [s["index"] for s in manifest.shards if s["complete"]]
    assert manifest.status == "running" and 1 <= len(done) < 4, done
    monkeypatch.undo()
    code, err = run(*args, "--resume", capsys=capsys)
    assert code == 0, err
    texts = [t for _, t in expected]
    manifest = check_output(out, expected, dict(zip(texts, engine.encode(texts, convert_to_numpy=True))))
    assert manifest["summary"]["shards_kept"] == len(done)


# -- progress and summary -------------------------------------------------------------------------------


def test_summary_reports_loading_and_embedding_apart(tmp_path, engine_dir, corpus, capsys):
    """The summary (manifest and printed line) gives the engine's load time and the embedding time
    apart; tokens/s is over the embedding time; the progress bar shows the loading first."""
    path, expected = corpus["jsonl"]
    out = tmp_path / "out"
    code = main([str(engine_dir), str(path), "--out", str(out), "--shard-size", "200"])
    err = capsys.readouterr().err
    assert code == 0, err
    s = Manifest.read(out).summary
    assert s["passages"] == len(expected) and s["tokens"] > 0
    assert 0 < s["load_seconds"] and 0 < s["embed_seconds"] <= s["seconds"]
    assert s["load_seconds"] + s["embed_seconds"] == pytest.approx(s["seconds"], abs=1e-6)
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["embed_seconds"])
    line = next(x for x in err.splitlines() if x.startswith("engine.embed: "))
    assert f"{s['load_seconds']:.1f} s loading the engine" in line, line
    assert f"{s['embed_seconds']:.1f} s embedding: {s['tokens_per_s']:,.0f} tokens/s" in line, line
    assert "loading the engine" in err.split("embed:")[0], err[:500]


# -- streaming and the exactly-once guard ---------------------------------------------------------------


def test_reading_streams_in_bounded_memory(tmp_path):
    """Scanning and reading a ~20 MB JSONL file allocates well under 1 MB (Python heap, traced):
    records are produced one at a time, never held."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"id": "x", "text": "word " * 160}) + "\n"  # ~820 bytes
    with open(path, "w") as f:
        for _ in range(25):
            f.write(line * 1000)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        plan = scan_corpus([path], 7_000)
        count = sum(1 for k in range(plan.num_shards) for _ in iter_shard(plan, k))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 25_000 and size > 20e6
    assert peak < 1e6, f"peak {peak / 1e6:.1f} MB while streaming a {size / 1e6:.0f} MB file"


def test_reading_parquet_streams_in_bounded_memory(tmp_path):
    """Arrow memory while reading a Parquet file stays near one row group (pyarrow's default
    pre-buffering would hold all the remaining ones: measured 12 MB for an 11 MB file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "big.parquet"
    texts = [f"passage {i} " + "lorem ipsum dolor " * 22 for i in range(30_000)]  # ~400 bytes each
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1_500, compression="none")
    size = path.stat().st_size
    plan = scan_corpus([path], 7_000)
    base = pa.total_allocated_bytes()
    peak = count = 0
    for k in range(plan.num_shards):
        for record in iter_shard(plan, k):
            count += 1
            if count % 250 == 0:
                peak = max(peak, pa.total_allocated_bytes() - base)
    assert count == 30_000 and size > 11e6
    assert peak < size / 5, f"peak {peak / 1e6:.1f} MB of Arrow memory reading a {size / 1e6:.0f} MB file"


def test_shard_sink_refuses_a_duplicate_or_missing_record(tmp_path, corpus):
    """The guard behind 'every passage exactly once': a runner that delivers a record twice (or
    skips one) stops the job before the shard is published."""
    path, _ = corpus["jsonl"]
    plan = scan_corpus([path], 400)
    out = tmp_path / "out"
    out.mkdir()
    manifest = Manifest.new(out, {}, [plan.shard_range(k) for k in range(plan.num_shards)], "parquet")

    def chunk(index: list[int]) -> Embedded:
        n = len(index)
        return Embedded(np.array(index), [str(i) for i in index], np.zeros(n, np.int64), np.ones(n, np.int64),
                        [None] * n, np.zeros((n, 4), np.float32), n, 0.0, "w")

    for bad in ([*range(0, 200), *range(199, 400)], [*range(0, 200), *range(201, 401)]):
        sink = ShardSink(out, plan, manifest, [0, 1], "parquet", 4, np.dtype(np.float32), False)
        with pytest.raises(RuntimeError, match="out of order or twice"):
            sink.add(chunk(bad))
        sink.abort()
        assert sorted(p.name for p in out.iterdir()) == []
    sink = ShardSink(out, plan, manifest, [0, 1], "parquet", 4, np.dtype(np.float32), False)
    sink.add(chunk(list(range(400))))
    with pytest.raises(RuntimeError, match="stopped before shard 1"):
        sink.close()
    assert (out / "shard-00000.parquet").exists() and manifest.shards[0]["complete"]
