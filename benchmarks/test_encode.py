"""Encode throughput: the engine's fast path, its reference path and transformers, side by side.

Same model (shapes and weights, from one saved checkpoint), same texts, whole ``encode`` calls timed
with pytest-benchmark (``benchmark.pedantic``: warm-up rounds, then a few timed rounds; on CUDA each
call ends with ``torch.cuda.synchronize()``). Each result's ``extra_info`` holds ``tokens_per_s``
(real tokens, padding excluded, over the median round), ``tokens_per_s_best_round`` (the fastest
round), ``layer_tokens_per_s`` (one layer's throughput: tokens/s x layers), ``tokens_per_s_32_layers``,
``tflops`` and, on CUDA, ``mfu`` and ``device_name``; transformers adds ``padded_tokens``.

    pytest benchmarks/test_encode.py                       # CPU: small model; GPU: Mistral-7B shape, 4 layers
    BENCH_LAYERS=8 pytest benchmarks/test_encode.py -s     # more layers

On a CPU, ``test_cpu_fast_path`` also runs bfloat16 encoding on a Qwen2-0.5B shape (see its docstring).
"""
from __future__ import annotations

import time
from statistics import median

import pytest
import torch

from corpora import CORPORA
from systems import BATCH_SIZE, CPU_FAST_INPUTS, CPU_FAST_LEN, FULL_LAYERS, PEAK_TFLOPS, SYSTEMS, matmul_peak_gflops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize("corpus_name", CORPORA)
@pytest.mark.parametrize("system_name", SYSTEMS)
def test_encode(benchmark, request, bench_setup, encode_results, system_name, corpus_name):
    setup = bench_setup
    if system_name == "engine_triton" and setup.device.type != "cuda":
        pytest.skip("the fast path is benchmarked on CUDA only: on CPU the Triton interpreter is far too slow "
                    "for throughput numbers (its correctness is covered by tests/)")
    if system_name == "engine_cpu" and setup.device.type != "cpu":
        pytest.skip("the CPU backend runs on the CPU only")
    bench = request.getfixturevalue("bench")  # built only once a test really runs
    corpus = bench.corpus(corpus_name)
    system = bench.system(system_name)
    benchmark.group = f"encode {corpus.label}"

    def run():
        system.encode(corpus.texts, batch_size=BATCH_SIZE)
        _sync(setup.device)

    benchmark.pedantic(run, rounds=setup.rounds, warmup_rounds=setup.warmup_rounds, iterations=1)
    if benchmark.stats is not None:
        seconds, best = benchmark.stats.stats.median, benchmark.stats.stats.min
    else:  # --benchmark-disable: one untimed call ran; time one more
        start = time.perf_counter()
        run()
        seconds = best = time.perf_counter() - start

    flops = setup.encode_flops(corpus.lengths)
    info = {
        "system": system_name,
        "corpus": corpus_name,
        "label": corpus.label,
        "device": str(setup.device),
        "model": setup.describe(),
        "layers": setup.layers,
        "texts": len(corpus.texts),
        "tokens": corpus.n_tokens,
        "seconds_median": seconds,
        "tokens_per_s": corpus.n_tokens / seconds,
        "tokens_per_s_best_round": corpus.n_tokens / best,
        "layer_tokens_per_s": corpus.n_tokens / seconds * setup.layers,
        "tokens_per_s_32_layers": corpus.n_tokens / seconds * setup.layers / FULL_LAYERS,
        "flops": flops,
        "tflops": flops / seconds / 1e12,
    }
    if setup.device.type == "cuda":
        info["mfu"] = info["tflops"] / PEAK_TFLOPS
        info["device_name"] = torch.cuda.get_device_name(setup.device)
    if system_name == "transformers":
        info["padded_tokens"] = system.padded_tokens  # tokens computed, padding included
    benchmark.extra_info.update(info)
    encode_results.append(info)


def test_systems_agree(bench):
    """The systems run the same model: embeddings of a few skewed-corpus texts agree (transformers
    pooled over the text tokens, as the engine pools, for this check only). Not a benchmark."""
    setup = bench.setup
    texts = bench.corpus("skewed").texts[:8]
    expected = bench.system("transformers").encode(texts, skip_bos=True)
    names = ["engine_reference"] + (["engine_triton"] if setup.device.type == "cuda" else ["engine_cpu"])
    for name in names:
        actual = bench.system(name).encode(texts, batch_size=BATCH_SIZE)
        cos = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
        bound = 0.999999 if setup.dtype == torch.float32 else 0.99
        assert cos.min() > bound, f"{name} vs transformers: cosine {cos.tolist()}"


CPU_FAST_SYSTEMS = ("engine_cpu", "engine_reference", "engine_cpu_float32", "transformers")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fast path is benchmarked on a machine without CUDA")
def test_cpu_fast_path(benchmark, cpu_fast_bench, cpu_fast_results):
    """bfloat16 encoding on the CPU against the bfloat16 matrix-product peak, measured in the same run.

    Model: the Qwen2-0.5B shape (``BENCH_CPU_LAYERS`` layers, default 2), bfloat16 weights. Corpus:
    16 inputs of 128 tokens (one batch of 2,048 tokens). Systems: the CPU backend in bfloat16, the
    reference backend in bfloat16, the CPU backend in float32 (the same weights, upcast), transformers
    in bfloat16 run LLM2Vec-style. The peaks: the model's four matrix products of one layer at 2,048
    rows, in bfloat16 and float32. Each round measures both peaks and then every system once, so that
    load on a shared machine hits them alike; a system's fraction is its useful GFLOP/s (model FLOPs,
    ``systems.encode_flops``) over its dtype's peak of the same round.
    """
    setup = cpu_fast_bench.setup
    corpus = cpu_fast_bench.corpus("long")
    texts = corpus.texts[:CPU_FAST_INPUTS]
    lengths = corpus.lengths[:CPU_FAST_INPUTS]
    assert set(lengths) == {CPU_FAST_LEN}
    systems = {name: cpu_fast_bench.system(name) for name in CPU_FAST_SYSTEMS}
    tokens, flops = sum(lengths), setup.encode_flops(lengths)
    peaks = {"bfloat16": [], "float32": []}
    seconds = {name: [] for name in systems}

    def one_round():
        for dtype in peaks:
            peaks[dtype].append(matmul_peak_gflops(setup.shape, tokens, getattr(torch, dtype)))
        for name, system in systems.items():
            start = time.perf_counter()
            system.encode(texts, batch_size=BATCH_SIZE)
            seconds[name].append(time.perf_counter() - start)

    one_round()  # warm-up, not recorded
    for series in (*peaks.values(), *seconds.values()):
        series.clear()
    benchmark.pedantic(one_round, rounds=setup.rounds, iterations=1)
    common = dict(model=setup.describe() + f" (encode on a CPU with {torch.get_num_threads()} threads)",
                  threads=torch.get_num_threads(), rounds=setup.rounds,
                  corpus=f"uniform {CPU_FAST_LEN} tok x {CPU_FAST_INPUTS} ({tokens:,} tokens)")
    for dtype, series in peaks.items():
        cpu_fast_results.append(dict(common, kind="peak", system=f"matmul peak {dtype}", gflops=median(series),
                                     gflops_best=max(series)))
    for name, series in seconds.items():
        dtype = "float32" if name.endswith("_float32") else "bfloat16"
        per_round = [flops / s / 1e9 for s in series]
        fractions = [g / p for g, p in zip(per_round, peaks[dtype])]
        label = f"{name.removesuffix('_float32')} {dtype}"
        result = dict(common, kind="system", system=label, tokens_per_s=tokens / median(series),
                      tokens_per_s_best=tokens / min(series), gflops=median(per_round), gflops_best=max(per_round),
                      fraction_of_peak=median(fractions), fraction_of_peak_best=max(fractions))
        cpu_fast_results.append(result)
        benchmark.extra_info[label] = {k: v for k, v in result.items() if k not in common}
    benchmark.extra_info.update(common)

