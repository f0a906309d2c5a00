"""Corpus encoding throughput: ``engine.embed`` (one worker, two Ray workers) beside ``Engine.encode``.

One process, one corpus, one model, two phases. First the in-process systems with no Ray running
(a live Ray instance's own processes take CPU from anything beside them on 2 cores): every round
runs each of them once, interleaved, so that load from elsewhere hits them alike. Then the Ray
systems, on a local Ray instance started for them, interleaved likewise. Systems (tokens are real
tokens, BOS included):

- ``encode``: ``Engine.encode`` of the passages already in memory (the engine loaded beforehand);
- ``embed``: ``embed_corpus`` in this process: reading the JSONL file, tokenising, the same batches,
  writing and hashing the Parquet shards, the manifest (engine load included: it is part of a job);
- ``embed_ray1`` / ``embed_ray2``: ``embed_corpus(workers=1 | 2)`` on a local Ray instance started
  once for the module (actor start-up and engine load in each actor included);

each at 1 torch thread per worker (``encode_2t`` / ``embed_2t``: one process with 2 threads, what one
worker does with both cores). Derived: ``embed / encode`` (the pipeline's overhead, target >= 0.90),
``ray1 / embed`` (Ray's), and the scaling efficiency ``ray2 / (2 x ray1)``; the workers' own busy
tokens/s (tokenisation + forward) separate the steady state from start-up.

    python -m pytest benchmarks/test_embed.py -q            # BENCH_EMBED_PASSAGES, BENCH_ROUNDS
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PASSAGES = int(os.environ.get("BENCH_EMBED_PASSAGES", "800"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
BATCH_SIZE, MAX_BATCH_TOKENS = 64, 16384
# Big enough that the forward dominates on the CPU (~6 MFLOP per token against microseconds of
# tokenisation), small enough for the benchmark's time budget.
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688, vocab_size=512,
             max_shard_size="4MB")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from converters.convert import convert
    from converters.tiny_models import sample_sentences, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("bench-embed")
    src = save_tiny_checkpoint(root / "hf", "llama", **MODEL)
    engine_dir = convert(src, root / "engine", quiet=True)
    texts = sample_sentences(PASSAGES, seed=3, min_words=8, max_words=32)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return root, engine_dir, corpus, texts


def _local_ray():
    pytest.importorskip("ray.data")
    sys.path.insert(0, str(REPO / "tests"))
    from _ray_local import LocalRay

    return LocalRay(num_cpus=2, object_store_mb=256)


def test_embed_pipeline_throughput(benchmark, request, setup):
    from engine import Engine
    from engine.embed import embed_corpus

    root, engine_dir, corpus, texts = setup
    engine = Engine.from_pretrained(engine_dir)
    tokens = sum(t.num_tokens for t in engine.tokenize(texts))
    threads_before = torch.get_num_threads()
    seconds: dict[str, list[float]] = {}
    busy: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        summary = fn()
        seconds.setdefault(name, []).append(time.perf_counter() - start)
        if summary is not None:
            assert summary["passages"] == PASSAGES and summary["tokens"] == tokens
            w = summary["workers"].values()
            busy.setdefault(name, []).append(sum(x["tokens"] for x in w) / max(x["seconds"] for x in w))

    def encode(threads: int):
        torch.set_num_threads(threads)
        engine.encode(texts, batch_size=BATCH_SIZE, max_batch_tokens=MAX_BATCH_TOKENS)
        torch.set_num_threads(threads_before)

    def embed(name: str, **kwargs):
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        return embed_corpus(engine_dir, [corpus], out, device="cpu", batch_size=BATCH_SIZE,
                            max_batch_tokens=MAX_BATCH_TOKENS, quiet=True, **kwargs)

    # Phase 1, no Ray running (a live Ray instance's processes take CPU from whatever runs beside it):
    # the in-process systems. Phase 2: the Ray systems on a local instance started for them.
    local = {
        "encode": lambda: encode(1),
        "embed": lambda: embed("embed", threads=1),
        "encode_2t": lambda: encode(2),
        "embed_2t": lambda: embed("embed_2t", threads=2),
    }
    on_ray = {
        "embed_ray1": lambda: embed("embed_ray1", workers=1, threads=1),
        "embed_ray2": lambda: embed("embed_ray2", workers=2, threads=1),
    }
    systems = {**local, **on_ray}
    encode(1)  # warm-up
    embed("warmup", threads=1)

    def one_round() -> None:
        for name, fn in local.items():
            timed(name, fn)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    with _local_ray():
        for _ in range(ROUNDS):
            for name, fn in on_ray.items():
                timed(name, fn)
    tps = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    busy_tps = {name: statistics.median(b) for name, b in busy.items()}
    ratios = {
        "embed / encode (1 thread)": tps["embed"] / tps["encode"],
        "embed / encode (2 threads)": tps["embed_2t"] / tps["encode_2t"],
        "ray1 / embed (1 thread)": tps["embed_ray1"] / tps["embed"],
        "scaling ray2 / (2 x ray1)": tps["embed_ray2"] / (2 * tps["embed_ray1"]),
        "scaling, workers' busy tokens/s": busy_tps["embed_ray2"] / (2 * busy_tps["embed_ray1"]),
        "ray2 / encode_2t": tps["embed_ray2"] / tps["encode_2t"],
    }
    benchmark.extra_info.update(passages=PASSAGES, tokens=tokens, rounds=ROUNDS, model=MODEL,
                                tokens_per_s=tps, busy_tokens_per_s=busy_tps, ratios=ratios,
                                seconds=seconds, cpu_count=os.cpu_count())
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    if tr is not None:
        tr.write_line("")
        tr.write_sep("=", "corpus encoding throughput, side by side")
        tr.write_line(f"model {MODEL}, {PASSAGES} passages, {tokens} tokens, batches of {BATCH_SIZE} / "
                      f"{MAX_BATCH_TOKENS} tokens, median of {ROUNDS} interleaved rounds per phase, torch {torch.__version__}, "
                      f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        tr.write_line(f"{'system':<14}{'threads':>18}{'wall s':>10}{'tokens/s':>12}{'busy tokens/s':>16}")
        labels = {"encode": "1", "embed": "1", "embed_ray1": "1 worker x 1", "embed_ray2": "2 workers x 1",
                  "encode_2t": "2", "embed_2t": "2"}
        for name in systems:
            b = f"{busy_tps[name]:>16,.0f}" if name in busy_tps else f"{'-':>16}"
            tr.write_line(f"{name:<14}{labels[name]:>18}{statistics.median(seconds[name]):>10.2f}"
                          f"{tps[name]:>12,.0f}{b}")
        for key, value in ratios.items():
            tr.write_line(f"{key:<34}{value:>8.2f}")
