"""Two serving properties a latency-critical service depends on, measured on one server in one run:

- **cold start**: from launching ``python -m engine.serve`` to ``GET /health`` answering 200 (the
  engine loaded, the port bound, the warm-up done), and to the first embedding answered;
- **fairness**: p50 / p99 of one client's single-sentence requests (closed loop) with the server
  otherwise idle, then while a bulk request of ``BENCH_FAIR_BULK`` sentences is being embedded, in the
  same process, against the same server. Round-robin scheduling (engine/serve/scheduler.py) should
  keep the second p99 near one forward of the bulk request's batches, not the bulk's whole duration.

The model is the serving benchmark's (``BENCH_SERVE_HIDDEN``, ``BENCH_SERVE_LAYERS``; random
Llama-family weights, float32 on CPU).

    pytest benchmarks/test_serve_fairness.py -s

Environment: ``BENCH_SERVE_THREADS`` (torch threads of the server; default cores - 1),
``BENCH_FAIR_BULK`` (sentences in the bulk request; default 20000), ``BENCH_FAIR_SECONDS`` (the idle
measurement; default 5).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402

from serve_load import LoadResult, ServerProcess, request_bytes, run_load, sample, stage_means  # noqa: E402
from test_serve import _build, _settings  # noqa: E402


def _percentiles(load: LoadResult) -> dict[str, float]:
    return {"requests": load.requests, "p50_ms": load.percentile(0.5) * 1e3, "p99_ms": load.percentile(0.99) * 1e3,
            "max_ms": max(load.latencies) * 1e3}


def run_benchmark(workdir: Path) -> dict:
    from converters.tiny_models import sample_sentences

    settings = _settings()
    bulk_n = int(os.environ.get("BENCH_FAIR_BULK", "20000"))
    idle_s = float(os.environ.get("BENCH_FAIR_SECONDS", "5"))
    engine_dir = _build(workdir, settings["hidden"], settings["layers"])
    launched = time.perf_counter()
    srv = ServerProcess(engine_dir, "--max-client-batch-size", str(bulk_n), "--max-queue-tokens", str(64 * bulk_n),
                        threads=settings["threads"], log=workdir / "fair.log")
    try:
        srv.wait_ready(poll=0.01)
        ready_s = time.perf_counter() - launched
        first = httpx.post(srv.url + "/v1/embeddings", json={"input": "the first sentence"}, timeout=60)
        first_s = time.perf_counter() - launched
        assert first.status_code == 200, first.text

        singles = sample_sentences(512, seed=1)
        payloads = [(request_bytes(srv.port, "/v1/embeddings", {"input": s}), 0) for s in singles]
        idle = run_load(srv.port, payloads, 1, warmup_s=1.0, measure_s=idle_s)

        bulk = sample_sentences(bulk_n, seed=2)
        outcome: dict = {}

        def send_bulk() -> None:
            t = time.perf_counter()
            r = httpx.post(srv.url + "/embed", json={"inputs": bulk}, timeout=3600)
            outcome.update(status=r.status_code, seconds=time.perf_counter() - t)

        before = srv.metrics()
        sender = threading.Thread(target=send_bulk)
        sender.start()
        deadline = time.monotonic() + 600
        while "engine_queue_requests 1.0" not in srv.metrics():  # the bulk request is queued
            assert time.monotonic() < deadline and sender.is_alive(), outcome
            time.sleep(0.005)
        # Single-sentence requests for as long as the bulk request's inputs are being embedded: until
        # the queue holds no more than one single sentence's tokens (its response, a large body, is
        # serialised and sent after that, and is not what is measured here).
        embedded = threading.Event()

        def watch() -> None:
            while not embedded.is_set():
                if sample(srv.metrics(), "engine_queue_tokens") <= 64:
                    embedded.set()
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.perf_counter()
        during = run_load(srv.port, payloads, 1, warmup_s=0.0, measure_s=3600.0, stop=embedded.is_set)
        embedding_s = time.perf_counter() - start
        sender.join()
        assert outcome.get("status") == 200, outcome
        forward_s = stage_means(before, srv.metrics())["forward"]
        return {"settings": settings, "bulk_sentences": bulk_n, "launch_to_ready_s": ready_s,
                "launch_to_first_embedding_s": first_s, "idle": _percentiles(idle),
                "during_bulk": _percentiles(during), "bulk_seconds": outcome["seconds"],
                "bulk_embedding_s": embedding_s, "mean_forward_during_bulk_s": forward_s}
    finally:
        srv.stop()


def report(r: dict) -> str:
    s = r["settings"]
    row = lambda name, p: f"{name:<28}{p['requests']:>9}{p['p50_ms']:>9.1f}{p['p99_ms']:>9.1f}{p['max_ms']:>9.1f}"  # noqa: E731
    return "\n".join([
        f"serving fairness and cold start: llama random, hidden {s['hidden']}, {s['layers']} layers, float32 on CPU; "
        f"server torch threads {s['threads']}, {s['cores']} cores",
        f"launch to ready {r['launch_to_ready_s']:.2f} s; launch to first embedding {r['launch_to_first_embedding_s']:.2f} s",
        f"bulk request: {r['bulk_sentences']} sentences embedded in {r['bulk_embedding_s']:.1f} s (answered in "
        f"{r['bulk_seconds']:.1f} s); its forwards (with the single "
        f"requests riding along) took {r['mean_forward_during_bulk_s'] * 1e3:.0f} ms on average: a single request "
        "waits for the forward in flight, then rides in the next",
        "",
        f"{'single-sentence requests':<28}{'count':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
        row("server otherwise idle", r["idle"]),
        row("while the bulk is embedded", r["during_bulk"]),
    ])


def test_fairness_and_cold_start(tmp_path, capsys):
    results = run_benchmark(tmp_path)
    with capsys.disabled():
        print("\n" + report(results))
    if os.environ.get("BENCH_FAIR_JSON"):
        Path(os.environ["BENCH_FAIR_JSON"]).write_text(json.dumps(results, indent=2))
    assert results["idle"]["requests"] > 0 and results["during_bulk"]["requests"] > 0
