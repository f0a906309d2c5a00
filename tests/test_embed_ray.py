"""python -m engine.embed --workers 2 on the test run's local Ray instance (``ray_instance`` in
conftest.py): every input format through the actor pool, and an actor killed mid-job.

The reference for every embedding is ``Engine.encode`` of the same passages; output files are read
back with pyarrow alone. The killed actor is found by its process title (Ray names Ray Data's actor
processes ``ray::MapWorker(MapBatches(EmbedWorker))``) and killed with SIGKILL, as the kernel's OOM
killer or a lost node would.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data", reason="the distributed extra (ray[data]) is not installed")

from _embed_corpus import WRITERS, read_output, relative_error, tiny_engine, write_txt  # noqa: E402
from engine import Engine  # noqa: E402
from engine.embed.cli import main  # noqa: E402

ACTOR_TITLE = b"ray::MapWorker(MapBatches(EmbedWorker))"


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    return tiny_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(engine_dir) -> Engine:
    return Engine.from_pretrained(engine_dir)


def _actor_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(ACTOR_TITLE):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_workers_match_encode_for_every_format(tmp_path, ray_instance, engine_dir, engine, capsys):
    files, expected = [], []
    for fmt, write in WRITERS.items():
        path = tmp_path / f"part.{fmt}"
        rows = write(path, 500)
        files.append(path)
        expected += [(f"{path}:{i}" if fmt == "txt" else i, t) for i, t in rows]
    out = tmp_path / "out"
    code = main([str(engine_dir), *map(str, files), "--out", str(out), "--workers", "2", "--threads", "1",
                 "--shard-size", "300", "--batch-size", "64", "--quiet"])
    assert code == 0, capsys.readouterr().err
    ids, emb, manifest = read_output(out)
    assert manifest["status"] == "complete" and ids == [i for i, _ in expected]
    want = engine.encode([t for _, t in expected], convert_to_numpy=True)
    err = relative_error(emb, want)
    assert err.max() <= 1e-6, f"max relative error {err.max():.3g}"
    workers = manifest["summary"]["workers"]
    assert len(workers) == 2 and sum(w["passages"] for w in workers.values()) == len(expected)


def test_an_actor_killed_mid_job_leaves_every_passage_exactly_once(tmp_path, ray_instance, engine_dir, engine,
                                                                    capsys):
    path = tmp_path / "corpus.txt"
    expected = write_txt(path, 4800, seed=11)
    out = tmp_path / "out"
    killed: dict[str, object] = {}

    def kill_one_actor_mid_job() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            try:
                shards = json.loads((out / "manifest.json").read_text())["shards"]
            except (OSError, ValueError, KeyError):
                shards = []
            done = sum(s["complete"] for s in shards)
            pids = _actor_pids()
            if done >= 1 and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.update(pid=pids[0], alive=pids, complete=done, shards=len(shards))
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_actor_mid_job, daemon=True)
    killer.start()
    # Small batches over many passages: the actors' work outlasts the first shard written, so that the
    # kill lands while the job still has passages to embed (with a few large batches both actors could
    # finish everything before the driver writes a shard).
    code = main([str(engine_dir), str(path), "--out", str(out), "--workers", "2", "--threads", "1",
                 "--shard-size", "200", "--batch-size", "16", "--quiet"])
    killer.join(timeout=5)
    assert code == 0, capsys.readouterr().err
    assert killed and killed["complete"] < killed["shards"], f"no actor was killed mid-job: {killed}"
    ids, emb, manifest = read_output(out)
    assert ids == [i for i, _ in expected]  # every passage exactly once, in order
    want = engine.encode([t for _, t in expected], convert_to_numpy=True)
    assert relative_error(emb, want).max() <= 1e-6
    # Whether Ray's replacement actor gets any of the remaining work is Ray's timing, not ours (the
    # surviving actor often finishes the job before the replacement has started): what is promised
    # is the output above. The work of a task lost with the killed actor was redone, never dropped.
    workers = manifest["summary"]["workers"]
    assert sum(w["passages"] for w in workers.values()) >= len(expected)
    assert np.all([s["complete"] for s in manifest["shards"]])
