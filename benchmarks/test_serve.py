"""Serving throughput and latency, side by side in one run: the server with its batching, the same
server with ``--max-batch-size 1`` (one forward per input), and the engine called directly.

Every client sends one short sentence per request (``sample_sentences``: 3 to 16 words) to
``POST /v1/embeddings`` (float JSON, as many clients ask), in a closed loop: 1, 32 and 64 concurrent
clients, each measured for ``BENCH_SERVE_SECONDS`` after a warm-up. The two servers run in their
own processes; they are measured one after the other, interleaved by concurrency, so they never
compete. In this process, with the same torch thread count as the servers: offline
``Engine.encode`` of the same corpus (tokens/s) and one direct ``encode([sentence])`` call per
sentence (latency). Where the time goes comes from the servers' own histograms (parse, tokenize,
queue, inference, serialize, and the whole request), read before and after each run.

The model is a random Llama-family checkpoint large enough that the forward dominates a request's
cost, as it does for real models: ``BENCH_SERVE_HIDDEN`` (default 512), ``BENCH_SERVE_LAYERS``
(default 4), intermediate 2.6875 x hidden, 8 heads, 4 kv heads.

    pytest benchmarks/test_serve.py -s                  # prints the table
    python benchmarks/test_serve.py                     # the same, without pytest

Environment: ``BENCH_SERVE_THREADS`` (torch threads for the servers and the direct calls; default:
cores - 1, leaving a core to the HTTP path and the load generator), ``BENCH_SERVE_SECONDS`` (default
6), ``BENCH_SERVE_ROUNDS`` (default 3), ``BENCH_SERVE_JSON`` (also write the results there).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from serve_load import STAGES, ServerProcess, request_bytes, run_load, stage_means  # noqa: E402

CONCURRENCY = (1, 32, 64)
SYSTEMS = {"batched": (), "per-input": ("--max-batch-size", "1")}
N_SENTENCES = 1024


def _settings() -> dict:
    cores = os.cpu_count() or 1
    return {
        "hidden": int(os.environ.get("BENCH_SERVE_HIDDEN", "512")),
        "layers": int(os.environ.get("BENCH_SERVE_LAYERS", "4")),
        "threads": int(os.environ.get("BENCH_SERVE_THREADS", str(max(1, cores - 1)))),
        "seconds": float(os.environ.get("BENCH_SERVE_SECONDS", "6")),
        "rounds": int(os.environ.get("BENCH_SERVE_ROUNDS", "3")),
        "cores": cores,
    }


def _build(root: Path, hidden: int, layers: int) -> Path:
    from converters.convert import convert
    from converters.tiny_models import save_tiny_checkpoint

    src = save_tiny_checkpoint(root / "hf", "llama", hidden_size=hidden, num_layers=layers, num_heads=8,
                               num_kv_heads=4, intermediate_size=hidden * 43 // 16, vocab_size=512,
                               max_shard_size="200MB")
    return convert(src, root / "bench-serve", quiet=True)


def run_benchmark(settings: dict, workdir: Path) -> dict:
    """``settings["rounds"]`` rounds; each measures offline encode, direct calls, then every
    (concurrency, system) pair, so that a change in the machine's load hits all systems alike."""
    from converters.tiny_models import sample_sentences
    from engine import Engine

    torch.set_num_threads(settings["threads"])
    engine_dir = _build(workdir, settings["hidden"], settings["layers"])
    servers = {name: ServerProcess(engine_dir, *args, threads=settings["threads"], log=workdir / f"{name}.log")
               for name, args in SYSTEMS.items()}
    try:
        engine = Engine.from_pretrained(engine_dir)
        corpus = sample_sentences(N_SENTENCES, seed=0)
        lengths = [t.num_tokens for t in engine.tokenize(corpus)]
        for srv in servers.values():
            srv.wait_ready()
        payloads = {name: [(request_bytes(srv.port, "/v1/embeddings",
                                          {"input": s, "model": "bench-serve", "encoding_format": "float"}), n)
                           for s, n in zip(corpus, lengths)] for name, srv in servers.items()}
        engine.encode(corpus[:64])
        rounds = []
        for k in range(settings["rounds"]):
            # The engine in this process, with the servers idle.
            start = time.perf_counter()
            engine.encode(corpus, batch_size=64)
            one = {"offline_tokens_per_s": sum(lengths) / (time.perf_counter() - start), "runs": {}}
            direct = []
            for s in corpus[:100]:
                t = time.perf_counter()
                engine.encode([s])
                direct.append(time.perf_counter() - t)
            one["direct_p50_s"] = statistics.median(direct)
            for clients in CONCURRENCY:
                for name, srv in servers.items():
                    before = srv.metrics()
                    load = run_load(srv.port, payloads[name], clients, warmup_s=1.0, measure_s=settings["seconds"])
                    one["runs"][f"{name}@{clients}"] = {
                        "requests_per_s": load.requests_per_s, "tokens_per_s": load.tokens_per_s,
                        "p50_s": load.percentile(0.5), "p99_s": load.percentile(0.99), "requests": load.requests,
                        "stages_s": stage_means(before, srv.metrics()),
                    }
                    print(f"  round {k + 1}: {name} x {clients}: {load.requests_per_s:.1f} req/s", file=sys.stderr,
                          flush=True)
            rounds.append(one)
        return {"settings": settings, "tokens_per_sentence": statistics.mean(lengths), "rounds": rounds}
    finally:
        for srv in servers.values():
            srv.stop()


def ratios(one: dict) -> dict[str, float]:
    """The three targets' ratios within one round."""
    runs = one["runs"]
    return {
        "batched_over_per_input_64": runs["batched@64"]["requests_per_s"] / runs["per-input@64"]["requests_per_s"],
        "batched_over_offline_64": runs["batched@64"]["tokens_per_s"] / one["offline_tokens_per_s"],
        "p50_over_direct_1": runs["batched@1"]["p50_s"] / one["direct_p50_s"],
        "p50_minus_direct_1_ms": (runs["batched@1"]["p50_s"] - one["direct_p50_s"]) * 1e3,
        "p50_over_direct_32": runs["batched@32"]["p50_s"] / one["direct_p50_s"],
    }


def _median(values) -> float:
    return statistics.median(list(values))


def report(results: dict) -> str:
    """Medians over rounds; the ratios are taken within each round, then their median. Stage columns
    are means per request from the server's histograms; ``http`` is the rest of the request as the
    HTTP layer sees it (body read, routing, thread hops, waiting for the tokenizer thread)."""
    s, rounds = results["settings"], results["rounds"]
    med = lambda f: _median(f(r) for r in rounds)  # noqa: E731
    lines = [
        f"serving benchmark: llama random, hidden {s['hidden']}, {s['layers']} layers, float32 on CPU; "
        f"torch threads {s['threads']} (servers and direct calls), {s['cores']} cores; {len(rounds)} rounds of "
        f"{s['seconds']:g} s per run after 1 s warm-up; {results['tokens_per_sentence']:.1f} tokens per sentence; "
        "medians over rounds",
        f"offline Engine.encode (batch 64): {med(lambda r: r['offline_tokens_per_s']):,.0f} tokens/s; "
        f"direct encode([sentence]) p50 {med(lambda r: r['direct_p50_s']) * 1e3:.2f} ms",
        "",
        f"{'system':<11}{'clients':>8}{'req/s':>9}{'tokens/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'in/fwd':>8}   mean ms: " + " ".join(f"{x:>9}" for x in (*STAGES, "http", "request", "forward")),
    ]
    for key in rounds[0]["runs"]:
        name, clients = key.split("@")
        run = lambda f: med(lambda r: f(r["runs"][key]))  # noqa: E731
        stage = lambda x: run(lambda v: v["stages_s"][x])  # noqa: E731
        lines.append(f"{name:<11}{clients:>8}{run(lambda v: v['requests_per_s']):>9.1f}"
                     f"{run(lambda v: v['tokens_per_s']):>10,.0f}{run(lambda v: v['p50_s']) * 1e3:>9.1f}"
                     f"{run(lambda v: v['p99_s']) * 1e3:>9.1f}{stage('batch_inputs'):>8.1f}            "
                     + " ".join(f"{v * 1e3:>9.2f}" for v in (*(stage(x) for x in STAGES),
                                                             stage("request") - sum(stage(x) for x in STAGES),
                                                             stage("request"), stage("forward"))))
    per_round = [ratios(r) for r in rounds]
    show = lambda k: " / ".join(f"{p[k]:.2f}" for p in per_round)  # noqa: E731
    lines += [
        "",
        f"64 clients: batched / per-input requests/s = {_median(p['batched_over_per_input_64'] for p in per_round):.2f}x "
        f"(rounds: {show('batched_over_per_input_64')}; target >= 4x)",
        f"64 clients: batched tokens/s / offline encode = {_median(p['batched_over_offline_64'] for p in per_round):.0%} "
        f"(rounds: {show('batched_over_offline_64')}; target >= 80%)",
        f"1 client: batched p50 / direct encode p50 = {_median(p['p50_over_direct_1'] for p in per_round):.2f}x "
        f"(rounds: {show('p50_over_direct_1')}; target <= 1.5x), "
        f"{_median(p['p50_minus_direct_1_ms'] for p in per_round):+.2f} ms (target: within about 3 ms)",
        f"32 clients: batched p50 / direct encode p50 = {_median(p['p50_over_direct_32'] for p in per_round):.2f}x "
        f"(rounds: {show('p50_over_direct_32')})",
    ]
    return "\n".join(lines)


def test_serving(tmp_path, capsys):
    results = run_benchmark(_settings(), tmp_path)
    with capsys.disabled():
        print("\n" + report(results))
    if os.environ.get("BENCH_SERVE_JSON"):
        Path(os.environ["BENCH_SERVE_JSON"]).write_text(json.dumps(results, indent=2))
    for one in results["rounds"]:
        for key, r in one["runs"].items():
            assert r["requests"] > 0, key


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        out = run_benchmark(_settings(), Path(tmp))
    print(report(out))
    if os.environ.get("BENCH_SERVE_JSON"):
        Path(os.environ["BENCH_SERVE_JSON"]).write_text(json.dumps(out, indent=2))
