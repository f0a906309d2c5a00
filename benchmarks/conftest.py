"""Benchmark-wide setup: the session's model and corpora, built once, and a side-by-side summary.

Without a GPU, Triton kernels can only run through the interpreter on CPU tensors, and
TRITON_INTERPRET must be set before triton is first imported, so it is set here (as in tests/).
The encode benchmarks do not use the interpreter: the fast path is benchmarked on CUDA only.

Environment: BENCH_DEVICE, BENCH_LAYERS, BENCH_LONG_LEN, BENCH_ROUNDS, BENCH_CACHE_DIR,
BENCH_PEAK_TFLOPS, BENCH_CPU_LAYERS (see benchmarks/systems.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# transformers >= 5.25 replaces layers with "hub kernels" downloaded from the Hugging Face Hub whenever
# HF's `kernels` package is installed: the reference models here must be transformers' own code, and
# nothing may be fetched from a hub.
os.environ["USE_HUB_KERNELS"] = "NO"
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside this file

from corpora import CORPORA, SIZES, build_corpus  # noqa: E402
from systems import BATCH_SIZE, FULL_LAYERS, PEAK_TFLOPS, SYSTEMS, BenchSetup  # noqa: E402

# Filled by test_encode.py: one dict per measured (system, corpus), read by the terminal summary.
ENCODE_RESULTS: list[dict] = []
# Filled by test_encode.py's CPU fast-path benchmark: one dict per system (and the matmul peaks).
CPU_FAST_RESULTS: list[dict] = []


class Bench:
    """The session's benchmark model: checkpoints on disk, corpora, and systems loaded on first use."""

    def __init__(self, setup: BenchSetup, root: Path) -> None:
        from systems import build_checkpoints

        self.setup = setup
        self.hf_dir, self.engine_dir = build_checkpoints(setup, root)
        self._systems: dict = {}
        self._corpora: dict = {}

    def system(self, name: str):
        """An object with ``encode(texts)``; loaded once per session."""
        if name not in self._systems:
            from systems import TransformersEncoder, load_engine

            if name == "transformers":
                self._systems[name] = TransformersEncoder.from_dir(self.hf_dir, self.setup)
            elif name.endswith("_float32"):  # the same checkpoint computed in float32
                self._systems[name] = load_engine(self.engine_dir, self.setup, name.removeprefix("engine_")
                                                  .removesuffix("_float32"), dtype=torch.float32)
            else:
                self._systems[name] = load_engine(self.engine_dir, self.setup, name.removeprefix("engine_"))
        return self._systems[name]

    def corpus(self, name: str):
        if name not in self._corpora:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.hf_dir))
            size = SIZES[self.setup.device.type]
            self._corpora[name] = build_corpus(tokenizer, name, size, self.setup.long_len, seed=CORPORA.index(name))
        return self._corpora[name]


@pytest.fixture(scope="session")
def bench_setup() -> BenchSetup:
    return BenchSetup.from_env()


@pytest.fixture(scope="session")
def bench(bench_setup, tmp_path_factory) -> Bench:
    return Bench(bench_setup, tmp_path_factory.mktemp("bench-model"))


@pytest.fixture(scope="session")
def encode_results() -> list[dict]:
    return ENCODE_RESULTS


@pytest.fixture(scope="session")
def cpu_fast_bench(tmp_path_factory) -> Bench:
    """The CPU fast path's model (Qwen2-0.5B shape, bfloat16), built on first use."""
    return Bench(BenchSetup.cpu_fast_path(), tmp_path_factory.mktemp("bench-cpu-fast"))


@pytest.fixture(scope="session")
def cpu_fast_results() -> list[dict]:
    return CPU_FAST_RESULTS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if CPU_FAST_RESULTS:
        _cpu_fast_summary(terminalreporter)
    if not ENCODE_RESULTS:
        return
    setup = BenchSetup.from_env()
    by_key = {(r["corpus"], r["system"]): r for r in ENCODE_RESULTS}
    corpora = [c for c in CORPORA if any(k[0] == c for k in by_key)]
    systems = [s for s in SYSTEMS if any(k[1] == s for k in by_key)]
    labels = {r["corpus"]: r["label"] for r in ENCODE_RESULTS}
    tr = terminalreporter
    tr.write_sep("=", "encode throughput, side by side")
    tr.write_line(setup.describe())
    tr.write_line(f"median of {setup.rounds} rounds after {setup.warmup_rounds} warm-up; whole encode calls "
                  f"(tokenisation to pooled float32 on the host), {BATCH_SIZE} inputs per batch")
    names = f"{'corpus':<48}" + "".join(f"{s:>18}" for s in systems)
    head = names
    if "transformers" in systems:
        head += "".join(f"{s.removeprefix('engine_') + '/hf':>14}" for s in systems if s != "transformers")
    tr.write_line("")
    tr.write_line("tokens/s (" + str(setup.layers) + " layers)")
    tr.write_line(head)
    for c in corpora:
        row = f"{labels[c]:<48}"
        row += "".join(f"{by_key[(c, s)]['tokens_per_s']:>18,.0f}" if (c, s) in by_key else f"{'-':>18}" for s in systems)
        hf = by_key.get((c, "transformers"))
        if hf:
            for s in systems:
                if s != "transformers":
                    r = by_key.get((c, s))
                    row += f"{r['tokens_per_s'] / hf['tokens_per_s']:>13.2f}x" if r else f"{'-':>14}"
        tr.write_line(row)
    for key, title in (
        ("tokens_per_s_best_round", "tokens/s over the fastest round (less exposed to other load on the machine)"),
        ("layer_tokens_per_s", f"per layer: tokens/s x {setup.layers} (one layer's throughput)"),
        ("tokens_per_s_32_layers", f"scaled to {FULL_LAYERS} layers: tokens/s x {setup.layers}/{FULL_LAYERS} "
                                   "(conservative: per-call costs outside the layers are scaled too)"),
    ):
        tr.write_line("")
        tr.write_line(title)
        tr.write_line(names)
        for c in corpora:
            row = f"{labels[c]:<48}"
            row += "".join(f"{by_key[(c, s)][key]:>18,.0f}" if (c, s) in by_key else f"{'-':>18}" for s in systems)
            tr.write_line(row)
    tr.write_line("")
    util = "model FLOP utilisation against %g TFLOP/s" % PEAK_TFLOPS if setup.device.type == "cuda" else "achieved"
    tr.write_line(f"useful TFLOP/s ({util}; FLOP count in benchmarks/systems.py)")
    tr.write_line(names)
    for c in corpora:
        row = f"{labels[c]:<48}"
        for s in systems:
            r = by_key.get((c, s))
            if r is None:
                row += f"{'-':>18}"
            elif "mfu" in r:
                row += f"{r['tflops']:>11.1f} ({r['mfu']:>4.0%})"
            else:
                row += f"{r['tflops']:>18.3f}"
        tr.write_line(row)


def _cpu_fast_summary(tr) -> None:
    rows = CPU_FAST_RESULTS
    tr.write_sep("=", "CPU fast path: encode against the matrix-product peak, side by side")
    tr.write_line(rows[0]["model"])
    tr.write_line(f"{rows[0]['threads']} threads; {rows[0]['corpus']}; {rows[0]['rounds']} interleaved rounds "
                  "(each: both peaks, then every system once); median round, best round in brackets")
    tr.write_line(f"{'system':<28}{'tokens/s':>18}{'GFLOP/s':>18}{'of its dtype peak':>26}")
    for r in rows:
        if r["kind"] == "peak":
            tr.write_line(f"{r['system']:<28}{'':>18}{r['gflops']:>9.1f} [{r['gflops_best']:>6.1f}]")
        else:
            tr.write_line(f"{r['system']:<28}{r['tokens_per_s']:>9,.0f} [{r['tokens_per_s_best']:>6,.0f}]"
                          f"{r['gflops']:>9.1f} [{r['gflops_best']:>6.1f}]"
                          f"{r['fraction_of_peak']:>17.0%} [{r['fraction_of_peak_best']:>5.0%}]")
