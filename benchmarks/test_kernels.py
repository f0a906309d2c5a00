"""Micro-benchmarks of the Triton kernels (pytest-benchmark).

On a GPU: realistic shapes in bfloat16; each case is warmed up (compilation, autotuning), timed with
CUDA events by ``triton.testing.do_bench``, and reported in ``extra_info`` as ``ms`` plus ``tflops``
(attention: 4 * sum(L_i^2) * n_heads * head_dim FLOPs, causal 4 * sum(L_i (L_i + 1) / 2) * ...: the
work above the diagonal is not counted) or ``gbps`` (memory-bound kernels: bytes that must cross HBM
at least once). The benchmark fixture's own wall-clock rounds synchronise after every call.
Attention runs bidirectional, causal and soft-capped (Gemma-2's cap of 50), its work list built once
outside the timing as the engine builds it once per batch, beside torch SDPA on the same
(equal-length) shapes. The causal and soft-capped rows are GPU-only.

On CPU the kernels run through the Triton interpreter on tiny shapes, a couple of rounds each, so
``pytest benchmarks/`` checks the benchmark code in seconds; those figures measure nothing.

    python -m pytest benchmarks/test_kernels.py --benchmark-columns=mean,rounds
"""
from __future__ import annotations

import os
from typing import Callable

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first import of triton (the kernels import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from encoder_kernels.activations import gated_activation  # noqa: E402
from encoder_kernels.attention import attention_plan, varlen_attention  # noqa: E402
from encoder_kernels.norms import rms_norm  # noqa: E402
from encoder_kernels.pooling import rms_norm_segment_pool, segment_pool  # noqa: E402
from encoder_kernels.rotary import rotary_, rotary_cos_sin, rotary_inv_freq  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float16  # the interpreter's bf16 tl.dot is wrong
GEN = torch.Generator().manual_seed(0)


def randn(*shape: int, dtype: torch.dtype = DTYPE, scale: float = 1.0) -> torch.Tensor:
    """Random (never zero) inputs, drawn on the CPU for reproducibility, then moved."""
    return (torch.randn(*shape, generator=GEN) * scale).to(dtype=dtype, device=DEVICE)


def measure(benchmark, fn: Callable[[], object], *, flops: float = 0.0, bytes_moved: float = 0.0) -> None:
    """Time ``fn`` and record throughput in ``benchmark.extra_info``."""
    if CUDA:
        fn()  # compile and autotune outside any timing
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=25, rep=200)

        def synced() -> None:
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=3)
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
    else:
        benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=1)
        ms = benchmark.stats.stats.mean * 1e3
        benchmark.extra_info["device"] = "cpu (Triton interpreter: not a performance figure)"
    benchmark.extra_info["ms"] = float(f"{ms:.4g}")
    if flops:
        benchmark.extra_info["tflops"] = float(f"{flops / ms / 1e9:.4g}")
    if bytes_moved:
        benchmark.extra_info["gbps"] = float(f"{bytes_moved / ms / 1e6:.4g}")


# --- attention ---------------------------------------------------------------------------------------

N_HEADS, N_KV, HEAD_DIM = (32, 8, 128) if CUDA else (2, 1, 64)
TOKENS = 16384 if CUDA else 48
SEQLENS = [1024, 2048, 4096] if CUDA else [16]


def attention_flops(lengths: list[int], causal: bool = False) -> float:
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    return 4.0 * pairs * N_HEADS * HEAD_DIM


# Attention variants: the flags of varlen_attention. Only the bidirectional one runs on CPU (the
# interpreter's figures measure nothing; one row checks the code).
ATTENTION_VARIANTS = {"bidirectional": {}, "causal": dict(causal=True), "softcap": dict(softcap=50.0)}


def _attention_variant(name: str) -> dict:
    if name != "bidirectional" and not CUDA:
        pytest.skip("GPU-only row: the interpreter's timings measure nothing")
    return ATTENTION_VARIANTS[name]


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("variant", list(ATTENTION_VARIANTS))
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_varlen_attention(benchmark, seqlen: int, variant: str) -> None:
    flags = _attention_variant(variant)
    lengths = [seqlen] * (TOKENS // seqlen)
    n = sum(lengths)
    # Views of a fused qkv projection, as the engine passes them.
    qkv = randn(n, (N_HEADS + 2 * N_KV) * HEAD_DIM)
    q = qkv[:, : N_HEADS * HEAD_DIM].view(n, N_HEADS, HEAD_DIM)
    k = qkv[:, N_HEADS * HEAD_DIM : (N_HEADS + N_KV) * HEAD_DIM].view(n, N_KV, HEAD_DIM)
    v = qkv[:, (N_HEADS + N_KV) * HEAD_DIM :].view(n, N_KV, HEAD_DIM)
    bounds = torch.tensor([0] + lengths).cumsum(0).to(dtype=torch.int32, device=DEVICE)
    plan = attention_plan(lengths, N_HEADS // N_KV, DEVICE)
    out = torch.empty_like(q)
    benchmark.extra_info["shape"] = f"{len(lengths)}x{seqlen} H={N_HEADS} KV={N_KV} D={HEAD_DIM} {DTYPE} {variant}"
    measure(benchmark, lambda: varlen_attention(q, k, v, bounds, seqlen, out=out, plan=plan, **flags),
            flops=attention_flops(lengths, flags.get("causal", False)))


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("variant", list(ATTENTION_VARIANTS))
def test_varlen_attention_mixed_lengths(benchmark, variant: str) -> None:
    """A packed batch of unequal lengths (what padding-based attention wastes work on)."""
    flags = _attention_variant(variant)
    lengths = [4096, 1500, 3000, 700, 2048, 1024, 2500, 600, 512, 300] if CUDA else [40, 3, 17]
    n = sum(lengths)
    q, k, v = randn(n, N_HEADS, HEAD_DIM), randn(n, N_KV, HEAD_DIM), randn(n, N_KV, HEAD_DIM)
    bounds = torch.tensor([0] + lengths).cumsum(0).to(dtype=torch.int32, device=DEVICE)
    plan = attention_plan(lengths, N_HEADS // N_KV, DEVICE)
    benchmark.extra_info["shape"] = f"lengths={lengths} H={N_HEADS} KV={N_KV} D={HEAD_DIM} {DTYPE} {variant}"
    measure(benchmark, lambda: varlen_attention(q, k, v, bounds, max(lengths), plan=plan, **flags),
            flops=attention_flops(lengths, flags.get("causal", False)))


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_torch_sdpa(benchmark, seqlen: int, causal: bool) -> None:
    """torch SDPA (flash backend on a GPU) on the same shapes, padded-free since lengths are equal."""
    if causal and not CUDA:
        pytest.skip("GPU-only row: the interpreter's timings measure nothing")
    batch = TOKENS // seqlen
    q = randn(batch, N_HEADS, seqlen, HEAD_DIM)
    # kv heads repeated outside the timing: SDPA's flash path takes equal head counts.
    k = randn(batch, N_KV, seqlen, HEAD_DIM).repeat_interleave(N_HEADS // N_KV, dim=1)
    v = randn(batch, N_KV, seqlen, HEAD_DIM).repeat_interleave(N_HEADS // N_KV, dim=1)
    benchmark.extra_info["shape"] = f"{batch}x{seqlen} H={N_HEADS} D={HEAD_DIM} {DTYPE}{' causal' if causal else ''}"
    measure(benchmark, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            flops=attention_flops([seqlen] * batch, causal))


# --- memory-bound kernels ----------------------------------------------------------------------------

HIDDEN = 4096 if CUDA else 64
N_SEQS, SEQ_TOKENS = (128, 256) if CUDA else (3, 9)


def _spans() -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(N_SEQS, device=DEVICE) * SEQ_TOKENS
    return starts + 4, starts + SEQ_TOKENS  # skip a 4-token instruction prefix, as instruction pooling does


@pytest.mark.benchmark(group="pooling")
def test_segment_pool(benchmark) -> None:
    hidden = randn(N_SEQS * SEQ_TOKENS, HIDDEN)
    starts, ends = _spans()
    rows = int((ends - starts).sum())
    out = torch.empty(N_SEQS, HIDDEN, device=DEVICE)
    benchmark.extra_info["shape"] = f"{N_SEQS} spans of {SEQ_TOKENS - 4} rows, hidden={HIDDEN} {DTYPE}"
    measure(benchmark, lambda: segment_pool(hidden, starts, ends, "mean", True, out=out),
            bytes_moved=rows * HIDDEN * hidden.element_size() + out.numel() * 4)


@pytest.mark.benchmark(group="pooling")
def test_rms_norm_segment_pool(benchmark) -> None:
    """Final norm + residual add + pooling in one kernel (the normed [T, hidden] is never written)."""
    hidden, residual = randn(N_SEQS * SEQ_TOKENS, HIDDEN), randn(N_SEQS * SEQ_TOKENS, HIDDEN)
    weight = randn(HIDDEN, scale=0.1) + 1
    starts, ends = _spans()
    rows = int((ends - starts).sum())
    out = torch.empty(N_SEQS, HIDDEN, device=DEVICE)
    benchmark.extra_info["shape"] = f"{N_SEQS} spans of {SEQ_TOKENS - 4} rows, hidden={HIDDEN} {DTYPE}"
    measure(benchmark,
            lambda: rms_norm_segment_pool(hidden, weight, 1e-6, starts, ends, "mean", True, residual=residual, out=out),
            bytes_moved=2 * rows * HIDDEN * hidden.element_size() + out.numel() * 4)


NORM_TOKENS = 32768 if CUDA else 37


@pytest.mark.benchmark(group="norms")
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(benchmark, with_residual: bool) -> None:
    x = randn(NORM_TOKENS, HIDDEN)
    residual = randn(NORM_TOKENS, HIDDEN) if with_residual else None
    weight = randn(HIDDEN, scale=0.1) + 1
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if with_residual else None
    # Reads x (and residual), writes y (and x + residual).
    n_tensors = 4 if with_residual else 2
    benchmark.extra_info["shape"] = f"{NORM_TOKENS}x{HIDDEN} {DTYPE}"
    measure(benchmark, lambda: rms_norm(x, weight, 1e-6, 0.0, residual, out=out, residual_out=summed),
            bytes_moved=n_tensors * x.numel() * x.element_size())


@pytest.mark.benchmark(group="rotary")
def test_rotary(benchmark) -> None:
    n = NORM_TOKENS
    qkv = randn(n, (N_HEADS + 2 * N_KV) * HEAD_DIM)
    q = qkv[:, : N_HEADS * HEAD_DIM].view(n, N_HEADS, HEAD_DIM)
    k = qkv[:, N_HEADS * HEAD_DIM : (N_HEADS + N_KV) * HEAD_DIM].view(n, N_KV, HEAD_DIM)
    cos, sin = rotary_cos_sin(torch.arange(n, device=DEVICE) % 4096, rotary_inv_freq(HEAD_DIM, 500000.0))
    # In place: q and k read and written once, cos and sin read once. Repeated rotation keeps the
    # values bounded (a rotation preserves norms), so the inputs never drift to zero or infinity.
    moved = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * 4
    benchmark.extra_info["shape"] = f"T={n} H={N_HEADS} KV={N_KV} D={HEAD_DIM} {DTYPE}"
    measure(benchmark, lambda: rotary_(q, k, cos, sin), bytes_moved=moved)


@pytest.mark.benchmark(group="activations")
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation(benchmark, activation: str) -> None:
    n, intermediate = (8192, 14336) if CUDA else (23, 40)
    gate_up = randn(n, 2 * intermediate, scale=2.0)
    out = torch.empty(n, intermediate, dtype=DTYPE, device=DEVICE)
    benchmark.extra_info["shape"] = f"{n}x{2 * intermediate} {DTYPE}"
    measure(benchmark, lambda: gated_activation(gate_up, activation, out=out),
            bytes_moved=3 * out.numel() * out.element_size())
