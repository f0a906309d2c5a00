"""Encode throughput: the engine's fast path, its reference path and transformers, side by side.

Same model (shapes and weights, from one saved checkpoint), same texts, whole ``encode`` calls timed
with pytest-benchmark (``benchmark.pedantic``: warm-up rounds, then a few timed rounds; on CUDA each
call ends with ``torch.cuda.synchronize()``). Each result's ``extra_info`` holds ``tokens_per_s``
(real tokens, padding excluded, over the median round), ``tokens_per_s_best_round`` (the fastest
round), ``layer_tokens_per_s`` (one layer's throughput: tokens/s x layers), ``tokens_per_s_32_layers``,
``tflops`` and, on CUDA, ``mfu`` and ``device_name``; transformers adds ``padded_tokens``.

    pytest benchmarks/test_encode.py                       # CPU: small model; GPU: Mistral-7B shape, 4 layers
    BENCH_LAYERS=8 pytest benchmarks/test_encode.py -s     # more layers
"""
from __future__ import annotations

import time

import pytest
import torch

from corpora import CORPORA
from systems import BATCH_SIZE, FULL_LAYERS, PEAK_TFLOPS, SYSTEMS


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
    names = ["engine_reference"] + (["engine_triton"] if setup.device.type == "cuda" else [])
    for name in names:
        actual = bench.system(name).encode(texts, batch_size=BATCH_SIZE)
        cos = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
        bound = 0.999999 if setup.dtype == torch.float32 else 0.99
        assert cos.min() > bound, f"{name} vs transformers: cosine {cos.tolist()}"
