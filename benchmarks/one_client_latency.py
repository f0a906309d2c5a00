"""One client's latency against a direct ``encode``, at the torch thread count a user would run with.

A Qwen3-layout random engine (``--hidden``, ``--layers``; 16 heads, 8 kv heads, intermediate 3 x
hidden), requests of about 110 tokens (eight short sentences each). A server in its own process with
``OMP_NUM_THREADS=--threads``, then, with the server idle, direct ``Engine.encode([text])`` calls in
this process at the same thread count; p50 of each, and the server's own stage means (where the
request's time goes). Run it on an idle machine:

    python benchmarks/one_client_latency.py [--threads 2] [--dtype float32|bfloat16] [--hidden 1024]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import ServerProcess, request_bytes, run_load, stage_means  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()

    import torch

    from converters.convert import convert
    from converters.tiny_models import sample_sentences, save_tiny_checkpoint
    from engine import Engine

    with tempfile.TemporaryDirectory(prefix="one-client-") as tmp:
        root = Path(tmp)
        src = save_tiny_checkpoint(root / "hf", "qwen3", hidden_size=args.hidden, num_layers=args.layers,
                                   num_heads=16, num_kv_heads=8, intermediate_size=3 * args.hidden, vocab_size=2048,
                                   max_shard_size="500MB")
        engine_dir = convert(src, root / "engine", quiet=True)
        torch.set_num_threads(args.threads)
        srv = ServerProcess(engine_dir, "--dtype", args.dtype, threads=args.threads, log=root / "server.log")
        try:
            texts = [" ".join(sample_sentences(8, seed=i, min_words=10, max_words=14)) for i in range(200)]
            srv.wait_ready()
            payloads = [(request_bytes(srv.port, "/v1/embeddings", {"input": t}), 0) for t in texts]
            before = srv.metrics()
            load = run_load(srv.port, payloads, 1, warmup_s=1.0, measure_s=args.seconds)
            stages = stage_means(before, srv.metrics())
        finally:
            srv.stop()
        engine = Engine.from_pretrained(engine_dir, dtype=args.dtype)
        tokens = statistics.mean(t.num_tokens for t in engine.tokenize(texts))
        for t in texts[:10]:
            engine.encode([t])
        direct = []
        for t in texts[:60]:
            start = time.perf_counter()
            engine.encode([t])
            direct.append(time.perf_counter() - start)
    print(f"qwen3 random, hidden {args.hidden}, {args.layers} layers, {args.dtype}, torch threads {args.threads}, "
          f"{tokens:.0f} tokens per request")
    print(f"direct encode p50 {statistics.median(direct) * 1e3:.1f} ms; served p50 {load.percentile(0.5) * 1e3:.1f} ms, "
          f"p99 {load.percentile(0.99) * 1e3:.1f} ms ({load.requests} requests)")
    print("server stage means, ms: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in stages.items()
                                                 if k in ("parse", "tokenize", "queue", "inference", "serialize",
                                                          "request")))


if __name__ == "__main__":
    main()
