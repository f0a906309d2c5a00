"""One command for the day a GPU is lent: the GPU-only tests, the kernel and encode benchmarks and the
targets of the fast path, on one H100/H200 in under 8 minutes.

    python -m benchmarks.gpu_check             # on the GPU machine (or: make gpu-check)
    python -m benchmarks.gpu_check --dry-run   # on a CPU: the same code on tiny shapes (Triton interpreter)

It needs only what the GPU machines carry (torch, triton, transformers, safetensors, pytest) and the
repository tree. Sections, in order (each time-boxed; a failure or a timeout is recorded and the run
goes on; the results are rewritten after every section, so a run cut short keeps what it measured):

- ``env``: versions, device, commit; the ceilings every figure is compared with, measured in this
  run: the bf16 matrix-product TFLOP/s and the copy bandwidth (bytes read + written per second).
- ``tests``: pytest on the GPU-only tests (``benchmarks/_gpu_tests.py`` says which), in a subprocess.
- ``attention``: ``varlen_attention`` TFLOP/s at 512/1k/2k/4k tokens per sequence (16k tokens per
  call) for head dims 128/64/256, beside ``scaled_dot_product_attention`` (flash, kv heads repeated)
  and, where torch has it, ``torch.nn.attention.varlen.varlen_attn``.
- ``memory_kernels``: RMSNorm (+ residual), the fused final norm + mean pooling, rotary and the gated
  activation in GB/s and as a fraction of the copy bandwidth.
- ``encode_*`` on the Mistral-7B shape, random weights built on the GPU (nothing written to disk):
  build + warm-up (graph capture), uniform 512 tokens, the skewed mix, one 32-token query (median and
  p99, with and without CUDA graphs, against the time to read the weights once), peak memory of a
  16k-token forward; model FLOP utilisation against the measured matrix-product peak.
- ``breakdown``: one 16k-token forward timed per op with CUDA events: matrix products, attention,
  element-wise (the rest), per layer.
- ``transformers``: transformers run LLM2Vec-style (sorted, batches of 32, left padding, 4-D
  bidirectional mask, SDPA) on the skewed mix, with the engine's own weights (views, no copy).

Writes ``benchmarks/results/gpu-<date>-<commit>.json`` and ``.md`` (a section for RESULTS.md with a
pass/miss column per target); ``--dry-run`` writes ``dryrun-...`` files. Exit status 0 when every
section ran, 1 otherwise (targets missed do not count: they are results), 2 on bad usage.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

# transformers >= 5.25 replaces layers with "hub kernels" downloaded from the Hugging Face Hub whenever
# HF's `kernels` package is installed: the reference models here must be transformers' own code, and
# nothing may be fetched from a hub.
os.environ["USE_HUB_KERNELS"] = "NO"
os.environ["HF_HUB_OFFLINE"] = "1"

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    # Must precede the first import of triton: the kernels then run in the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1 << 30


# --- what is measured, on a GPU and in the dry run ------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Shapes, counts and time boxes of one run."""

    dtype_name: str
    encode_backend: str  # the engine backend of the encode sections
    matmul_n: int  # ceiling: an n x n x n product
    copy_bytes: int
    head_dims: tuple[int, ...]
    seqlens: tuple[int, ...]
    attn_tokens: int
    attn_heads: tuple[int, int]  # (q heads, kv heads)
    mem_tokens: int
    model: dict  # the encode model's shape (benchmarks.systems.MISTRAL_7B on a GPU)
    layers: int
    max_length: int
    uniform: tuple[int, int]  # (inputs, tokens each)
    skewed: int  # inputs; long ones near max_length
    query_len: int
    query_reps: int
    memory_tokens: int
    rounds: int
    budgets: dict  # section -> seconds

    @property
    def dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype_name)


GPU_PLAN = Plan(
    dtype_name="bfloat16", encode_backend="triton", matmul_n=8192, copy_bytes=GIB, head_dims=(128, 64, 256), seqlens=(512, 1024, 2048, 4096),
    attn_tokens=16384, attn_heads=(32, 8), mem_tokens=16384,
    model=dict(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32000),
    layers=32, max_length=512, uniform=(64, 512), skewed=1024, query_len=32, query_reps=100, memory_tokens=16384,
    rounds=3,
    budgets=dict(env=30, tests=120, attention=75, memory_kernels=25, encode_build=60, encode_uniform=25,
                 encode_skewed=25, encode_query=20, encode_memory=15, breakdown=20, transformers=50),
)
DRY_PLAN = Plan(
    # The encode sections use the CPU backend: through the interpreter one forward takes seconds.
    dtype_name="float32", encode_backend="cpu", matmul_n=256, copy_bytes=8 << 20, head_dims=(16,), seqlens=(16, 32), attn_tokens=64,
    attn_heads=(2, 1), mem_tokens=32,
    model=dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=1000),
    layers=2, max_length=64, uniform=(4, 32), skewed=12, query_len=8, query_reps=3, memory_tokens=128,
    rounds=1,
    # Generous: the dry run proves the code runs; its time boxes only stop a hang (shared CI machines).
    budgets=dict(env=60, tests=120, attention=60, memory_kernels=60, encode_build=120, encode_uniform=60,
                 encode_skewed=60, encode_query=60, encode_memory=60, breakdown=60, transformers=60),
)

# (section, group): groups run in their own processes, sections of a group share one (in the dry run
# every benchmark section shares one: process starts dominate there).
SECTIONS = (
    ("tests", "tests"), ("env", "kernels"), ("attention", "kernels"), ("memory_kernels", "kernels"),
    ("encode_build", "encode"), ("encode_uniform", "encode"), ("encode_skewed", "encode"),
    ("encode_query", "encode"), ("encode_memory", "encode"), ("breakdown", "encode"), ("transformers", "encode"),
)
TARGETS = (
    # (name, what, comparison, threshold)
    ("attention_d128", "attention, non-causal d128, 1k-4k (lowest), TFLOP/s", ">=", 450.0),
    ("mfu_uniform_512", "uniform-512 encode, model FLOP utilisation", ">=", 0.60),
    ("skewed_vs_transformers", "skewed mix, engine / transformers (LLM2Vec-style)", ">=", 3.0),
    ("query_vs_weight_read", "one 32-token query median / time to read the weights once", "<=", 1.3),
    ("norm_vs_copy", "RMSNorm (+ residual), fraction of copy bandwidth", ">=", 0.80),
    ("pooling_vs_copy", "final norm + pooling, fraction of copy bandwidth", ">=", 0.80),
    ("peak_memory_16k", "peak memory at 16k tokens per forward, GiB above the weights", "<=", 2.0),
)


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise SectionTimeout in this (main) thread after ``seconds``."""
    def expire(signum, frame):
        raise SectionTimeout(f"time box of {seconds:.0f} s exceeded")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- timing ---------------------------------------------------------------------------------------


def sync(device: "torch.device") -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_ms(fn: Callable[[], Any], device: "torch.device", reps: int = 3) -> float:
    """Median milliseconds of ``fn`` after warm-up: CUDA events (triton's do_bench) on a GPU, the wall
    clock on a CPU (dry run: the figure measures the interpreter, nothing else)."""
    fn()
    sync(device)
    if device.type == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def wall_seconds(fn: Callable[[], Any], device: "torch.device", rounds: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``rounds`` calls after ``warmup`` (each call ends synchronised)."""
    for _ in range(warmup):
        fn()
        sync(device)
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# --- the run's shared state -----------------------------------------------------------------------


@dataclass
class Context:
    plan: Plan
    device: "torch.device"
    results: dict  # every section's record so far (ceilings for later groups)
    cache: dict = field(default_factory=dict)  # objects shared by the sections of one process

    def data(self, section: str) -> dict:
        return self.results.get("sections", {}).get(section, {}).get("data", {})

    def ceiling(self, key: str) -> float:
        value = self.data("env").get(key)
        if value is None:
            raise RuntimeError(f"the env section did not measure {key}")
        return float(value)


def gen_randn(shape, dtype, device, scale: float = 1.0, seed: int = 0) -> "torch.Tensor":
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


# --- sections -------------------------------------------------------------------------------------


def section_env(ctx: Context, rec: dict) -> None:
    from importlib.metadata import version

    import torch

    rec.update(torch=torch.__version__, triton=version("triton"), transformers=version("transformers"),
               python=platform.python_version(), device=_device_name(ctx.device),
               triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    n, dtype = ctx.plan.matmul_n, ctx.plan.dtype
    a, b = gen_randn((n, n), dtype, ctx.device), gen_randn((n, n), dtype, ctx.device, seed=1)
    ms = kernel_ms(lambda: a @ b, ctx.device)
    rec["matmul_tflops"] = 2 * n**3 / ms / 1e9
    src = torch.empty(ctx.plan.copy_bytes // 2, dtype=torch.bfloat16, device=ctx.device).normal_()
    dst = torch.empty_like(src)
    ms = kernel_ms(lambda: dst.copy_(src), ctx.device)
    rec["copy_gbps"] = 2 * src.numel() * src.element_size() / ms / 1e6  # read + write


def section_attention(ctx: Context, rec: dict) -> None:
    import torch

    import torch.nn.functional as F

    from encoder_kernels.attention import varlen_attention

    plan, device = ctx.plan, ctx.device
    n_heads, n_kv = plan.attn_heads
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    rec["varlen_attn"] = "absent" if varlen_attn is None else ("CUDA only" if device.type != "cuda" else "measured")
    rec["rows"] = rows = []
    for head_dim in plan.head_dims:
        for seqlen in plan.seqlens:
            batch = max(1, plan.attn_tokens // seqlen)
            total = batch * seqlen
            flops = 4.0 * batch * seqlen**2 * n_heads * head_dim
            row = dict(head_dim=head_dim, seqlen=seqlen, batch=batch)
            qkv = gen_randn((total, (n_heads + 2 * n_kv) * head_dim), plan.dtype, device)
            q = qkv[:, : n_heads * head_dim].view(total, n_heads, head_dim)
            k = qkv[:, n_heads * head_dim : (n_heads + n_kv) * head_dim].view(total, n_kv, head_dim)
            v = qkv[:, (n_heads + n_kv) * head_dim :].view(total, n_kv, head_dim)
            cu = torch.arange(0, total + 1, seqlen, dtype=torch.int32, device=device)
            out = torch.empty_like(q)
            row["engine_tflops"] = flops / kernel_ms(lambda: varlen_attention(q, k, v, cu, seqlen, out=out), device) / 1e9
            # SDPA on [batch, heads, L, D] with the kv heads repeated outside the timing (flash needs
            # equal head counts); on a CPU whatever backend torch picks.
            q4 = q.reshape(batch, seqlen, n_heads, head_dim).transpose(1, 2).contiguous()
            k4, v4 = (t.reshape(batch, seqlen, n_kv, head_dim).transpose(1, 2).repeat_interleave(n_heads // n_kv, 1)
                      .contiguous() for t in (k, v))
            row["sdpa_tflops"] = flops / kernel_ms(lambda: F.scaled_dot_product_attention(q4, k4, v4), device) / 1e9
            if varlen_attn is not None and device.type == "cuda":
                kf, vf = (t.repeat_interleave(n_heads // n_kv, 1) for t in (k, v))
                qc = q.contiguous()
                try:
                    ms = kernel_ms(lambda: varlen_attn(qc, kf, vf, cu, cu, seqlen, seqlen), device)
                    row["varlen_attn_tflops"] = flops / ms / 1e9
                except Exception as exc:  # an unsupported dtype or head dim in this torch build
                    row["varlen_attn_error"] = _one_line(exc)
            rows.append(row)
            del qkv, q4, k4, v4, out


def section_memory_kernels(ctx: Context, rec: dict) -> None:
    import torch

    from encoder_kernels.activations import gated_activation
    from encoder_kernels.norms import rms_norm
    from encoder_kernels.pooling import rms_norm_segment_pool
    from encoder_kernels.rotary import rotary_, rotary_cos_sin, rotary_inv_freq

    plan, device, dtype = ctx.plan, ctx.device, ctx.plan.dtype
    shape = plan.model
    t, hidden, inter = plan.mem_tokens, shape["hidden_size"], shape["intermediate_size"]
    heads, kv, hd = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    es = torch.finfo(dtype).bits // 8
    copy = ctx.ceiling("copy_gbps")
    x, r = gen_randn((t, hidden), dtype, device), gen_randn((t, hidden), dtype, device, seed=1)
    w = gen_randn((hidden,), dtype, device, seed=2, scale=0.1) + 1
    lengths = [plan.max_length] * (t // plan.max_length) or [t]
    bounds = torch.tensor([0, *lengths], device=device).cumsum(0)
    starts, ends = bounds[:-1].contiguous(), bounds[1:].contiguous()
    qkv = gen_randn((t, (heads + 2 * kv) * hd), dtype, device, seed=3)
    q = qkv[:, : heads * hd].view(t, heads, hd)
    k = qkv[:, heads * hd : (heads + kv) * hd].view(t, kv, hd)
    positions = torch.arange(t, device=device) % plan.max_length
    cos, sin = rotary_cos_sin(positions, rotary_inv_freq(hd, 10000.0).to(device))
    gu = gen_randn((t, 2 * inter), dtype, device, seed=4)
    cases = {
        # name: (call, bytes that must cross memory at least once)
        "rms_norm_residual": (lambda: rms_norm(x, w, 1e-5, 0.0, r), 4 * t * hidden * es),
        "norm_pool_mean": (lambda: rms_norm_segment_pool(x, w, 1e-5, starts, ends, "mean", residual=r, check=False),
                           2 * t * hidden * es + len(lengths) * hidden * 4),
        "rotary": (lambda: rotary_(q, k, cos, sin), 2 * t * (heads + kv) * hd * es + 2 * t * (hd // 2) * 4),
        "gated_activation": (lambda: gated_activation(gu, "silu"), 3 * t * inter * es),
    }
    for name, (call, n_bytes) in cases.items():
        gbps = n_bytes / kernel_ms(call, device) / 1e6
        rec[name] = dict(gbps=gbps, fraction_of_copy=gbps / copy, bytes=n_bytes)


def _engine(ctx: Context):
    engine = ctx.cache.get("engine")
    if engine is None:
        raise RuntimeError("no engine: the encode_build section did not complete")
    return engine


def section_encode_build(ctx: Context, rec: dict) -> None:
    import torch

    from transformers import MistralConfig

    from benchmarks.corpora import CorpusSize, corpus_lengths, texts_with_lengths
    from converters.tiny_models import train_tokenizer
    from engine.backends import get_ops
    from engine.config import ModelConfig
    from engine.encoder import Engine
    from engine.format import EngineConfig
    from engine.graphs import BucketedForward
    from engine.inputs import tokenizer_rules
    from engine.model import EncoderModel

    plan, device, dtype = ctx.plan, ctx.device, ctx.plan.dtype
    s = plan.model
    start = time.perf_counter()
    hf_config = MistralConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=plan.layers, num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["head_dim"], max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    cfg = ModelConfig.from_hf(hf_config.to_dict())
    with torch.device("meta"):
        model = EncoderModel(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)  # allocated once, in the compute dtype
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.02)
    model.eval().requires_grad_(False)
    model.ops = get_ops(plan.encode_backend, device)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_tok_"))
    tokenizer = train_tokenizer(workdir, "mistral", vocab_size=min(2000, s["vocab_size"]))
    config = EngineConfig(model=cfg, dtype=str(dtype).removeprefix("torch."), max_length=plan.max_length)
    rules = tokenizer_rules(tokenizer, plan.max_length, cfg.vocab_size)
    engine = Engine(model, tokenizer, config, path=workdir, pooling="mean", rules=rules)
    if not engine.cuda_graphs:
        # No CUDA (dry run): the same padding to bucket shapes, run eagerly instead of replayed.
        engine._buckets = BucketedForward(model, graphs=False)
    ctx.cache.update(engine=engine, hf_config=hf_config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rec.update(build_s=time.perf_counter() - start, weights_gib=weights / GIB,
               weights_read_gib=(weights - model.embed.weight.numel() * model.embed.weight.element_size()) / GIB,
               cuda_graphs=engine.cuda_graphs)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    rec["warmup_lengths"] = engine.warmup(max_batch_tokens=plan.memory_tokens)
    rec["warmup_s"] = time.perf_counter() - start
    rec["graphs_captured"] = len(engine._buckets.captured) if engine._buckets is not None else 0
    if device.type == "cuda":
        rec["graph_memory_gib"] = (torch.cuda.memory_allocated(device) - before) / GIB
    size = CorpusSize(n_short=0, n_long=plan.uniform[0], n_skewed=plan.skewed)
    lengths = {
        "uniform": corpus_lengths("long", size, plan.uniform[1]),
        "skewed": corpus_lengths("skewed", size, plan.max_length, seed=2),
        "query": [plan.query_len],
    }
    ctx.cache["corpora"] = {name: (texts_with_lengths(tokenizer, ls, seed=i), ls) for i, (name, ls) in enumerate(lengths.items())}


def _encode_throughput(ctx: Context, rec: dict, corpus: str) -> None:
    from benchmarks.systems import BATCH_SIZE, encode_flops

    engine = _engine(ctx)
    texts, lengths = ctx.cache["corpora"][corpus]
    seconds = wall_seconds(lambda: engine.encode(texts, batch_size=BATCH_SIZE), ctx.device, ctx.plan.rounds)
    median = statistics.median(seconds)
    flops = encode_flops(ctx.plan.model, ctx.plan.layers, lengths)
    rec.update(inputs=len(texts), tokens=sum(lengths), seconds=seconds, tokens_per_s=sum(lengths) / median,
               tflops=flops / median / 1e12, mfu=flops / median / 1e12 / ctx.ceiling("matmul_tflops"))


def section_encode_uniform(ctx: Context, rec: dict) -> None:
    _encode_throughput(ctx, rec, "uniform")


def section_encode_skewed(ctx: Context, rec: dict) -> None:
    _encode_throughput(ctx, rec, "skewed")


def section_encode_query(ctx: Context, rec: dict) -> None:
    engine = _engine(ctx)
    (text,), _ = ctx.cache["corpora"]["query"]
    buckets = engine._buckets
    read_s = ctx.data("encode_build")["weights_read_gib"] * GIB / (ctx.ceiling("copy_gbps") * 1e9)
    rec.update(weight_read_ms=read_s * 1e3, query_tokens=ctx.plan.query_len)
    for label, runner in (("graphs", buckets), ("eager", None)):
        engine._buckets = runner
        try:
            times = wall_seconds(lambda: engine.encode(text), ctx.device, ctx.plan.query_reps, warmup=3)
        finally:
            engine._buckets = buckets
        rec[label] = dict(median_ms=statistics.median(times) * 1e3, p99_ms=percentile(times, 99) * 1e3,
                          reps=len(times), vs_weight_read=statistics.median(times) / read_s)


def section_encode_memory(ctx: Context, rec: dict) -> None:
    import torch

    from engine.inputs import TokenizedExample

    engine, device, plan = _engine(ctx), ctx.device, ctx.plan
    length = plan.max_length
    vocab = plan.model["vocab_size"]
    items = [TokenizedExample([(11 + 7 * i + j) % vocab for j in range(length)], 1, length)
             for i in range(plan.memory_tokens // length)]
    rec["tokens"] = sum(t.num_tokens for t in items)
    if device.type != "cuda":
        engine.embed_tokenized(items)
        rec["note"] = "no CUDA memory statistics on a CPU: the forward ran, nothing was measured"
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    engine.embed_tokenized(items)
    sync(device)
    extra = torch.cuda.max_memory_allocated(device) - before
    rec.update(above_weights_gib=extra / GIB, peak_gib=ctx.data("encode_build")["weights_gib"] + extra / GIB)


def section_breakdown(ctx: Context, rec: dict) -> None:
    import torch

    import dataclasses

    from engine.inputs import TokenizedExample

    engine, device, plan = _engine(ctx), ctx.device, ctx.plan
    length = plan.max_length
    items = [TokenizedExample([(5 + 3 * i + j) % plan.model["vocab_size"] for j in range(length)], 1, length)
             for i in range(plan.memory_tokens // length)]
    engine.embed_tokenized(items)  # warm: tuned and compiled
    spans = _Spans(device)
    model, ops = engine.model, engine.model.ops
    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(lambda m, args: spans.open(("matmul", id(m)))))
            hooks.append(module.register_forward_hook(lambda m, args, out: spans.close(("matmul", id(m)), "matmul")))
    model.ops = dataclasses.replace(ops, attention=spans.wrap("attention", ops.attention))
    buckets, engine._buckets = engine._buckets, None
    try:
        spans.open("total")
        engine.embed_tokenized(items)
        spans.close("total", "total")
    finally:
        model.ops, engine._buckets = ops, buckets
        for h in hooks:
            h.remove()
    ms = spans.totals_ms()
    layers = plan.layers
    other = ms["total"] - ms.get("matmul", 0.0) - ms.get("attention", 0.0)
    rec.update(tokens=len(items) * length, total_ms=ms["total"],
               per_layer_ms=dict(matmul=ms.get("matmul", 0.0) / layers, attention=ms.get("attention", 0.0) / layers,
                                 elementwise=other / layers),
               fractions=dict(matmul=ms.get("matmul", 0.0) / ms["total"], attention=ms.get("attention", 0.0) / ms["total"],
                              elementwise=other / ms["total"]))


class _Spans:
    """Time intervals by category: CUDA events on a GPU (read once at the end), the clock elsewhere."""

    def __init__(self, device: "torch.device") -> None:
        self.cuda = device.type == "cuda"
        self._open: dict = {}
        self._closed: list[tuple[str, Any, Any]] = []

    def _mark(self):
        import torch

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def open(self, key) -> None:
        self._open[key] = self._mark()

    def close(self, key, category: str) -> None:
        self._closed.append((category, self._open.pop(key), self._mark()))

    def wrap(self, category: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            key = object()
            self.open(key)
            out = fn(*args, **kwargs)
            self.close(key, category)
            return out
        return timed

    def totals_ms(self) -> dict[str, float]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for category, start, end in self._closed:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            out[category] = out.get(category, 0.0) + ms
        return out


def section_transformers(ctx: Context, rec: dict) -> None:
    import torch

    from benchmarks.systems import BATCH_SIZE, TransformersEncoder, transformers_sharing_weights

    engine, device = _engine(ctx), ctx.device
    hf = transformers_sharing_weights(engine.model, ctx.cache["hf_config"])
    encoder = TransformersEncoder(hf, engine.tokenizer, device, ctx.plan.dtype, max_length=ctx.plan.max_length)
    texts, lengths = ctx.cache["corpora"]["skewed"]
    check = texts[:8]
    cos = torch.nn.functional.cosine_similarity(engine.encode(check), encoder.encode(check, skip_bos=True), dim=-1)
    rec["agreement_min_cosine"] = float(cos.min())
    seconds = wall_seconds(lambda: encoder.encode(texts, batch_size=BATCH_SIZE), device, max(1, ctx.plan.rounds - 1))
    rec.update(tokens=sum(lengths), padded_tokens=encoder.padded_tokens, seconds=seconds,
               tokens_per_s=sum(lengths) / statistics.median(seconds))
    engine_tps = ctx.data("encode_skewed").get("tokens_per_s")
    if engine_tps:
        rec["engine_over_transformers"] = engine_tps / rec["tokens_per_s"]


SECTION_FUNCTIONS: dict[str, Callable[[Context, dict], None]] = {
    "env": section_env, "attention": section_attention, "memory_kernels": section_memory_kernels,
    "encode_build": section_encode_build, "encode_uniform": section_encode_uniform,
    "encode_skewed": section_encode_skewed, "encode_query": section_encode_query,
    "encode_memory": section_encode_memory, "breakdown": section_breakdown, "transformers": section_transformers,
}


# --- the GPU-only tests ---------------------------------------------------------------------------

# Test modules that import what the GPU machines do not carry (the server, Ray) fail to collect there;
# those are reported apart from real errors.
_OPTIONAL = ("fastapi", "uvicorn", "pydantic", "prometheus_client", "ray", "pyarrow", "openai", "httpx",
             "sentence_transformers", "matplotlib")


def run_tests(plan: Plan, dry_run: bool, budget: float, rec: dict) -> None:
    """pytest on the GPU-only tests, in a subprocess bounded by ``budget``; outcomes from JUnit XML.
    The dry run only collects (without CUDA they would all skip), over the files known to hold some."""
    junit = Path(tempfile.mkdtemp(prefix="gpu_check_pytest_")) / "junit.xml"
    paths = ["tests/test_gpu_only_sync.py"] if dry_run else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "benchmarks._gpu_tests", f"--junitxml={junit}",
           "--continue-on-collection-errors", "-p", "no:cacheprovider", *paths]
    if dry_run:
        cmd.append("--collect-only")
    rec["command"] = " ".join(["python", *cmd[1:]])
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as exc:
        rec["timed_out"] = True
        rec["output_tail"] = _tail((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        raise SectionTimeout(f"pytest ran past its {budget:.0f} s") from None
    rec["returncode"] = proc.returncode
    rec["output_tail"] = _tail(proc.stdout + proc.stderr)
    if dry_run:
        selected = [line for line in proc.stdout.splitlines() if "::" in line]
        rec["collected"] = len(selected)
        if proc.returncode != 0 or not selected:
            raise RuntimeError(f"collection of the GPU-only tests failed (exit {proc.returncode})")
        return
    counts = dict(passed=0, failed=0, errors=0, skipped=0, missing_dependency=0)
    failures = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                text = (bad.get("message") or "") + (bad.text or "")
                if any(f"No module named '{m}" in text for m in _OPTIONAL):
                    counts["missing_dependency"] += 1
                    continue
                counts["failed" if bad.tag == "failure" else "errors"] += 1
                failures.append(f"{name}: {_one_line(bad.get('message') or bad.text or '')}"[:300])
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    rec.update(counts=counts, failures=failures[:30])
    if counts["failed"] or counts["errors"] or (proc.returncode not in (0, 1, 5)):
        raise RuntimeError(f"{counts['failed']} failed, {counts['errors']} errors (pytest exit {proc.returncode})")


# --- orchestration --------------------------------------------------------------------------------


def _one_line(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:400]


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def _device_name(device: "torch.device") -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, Triton interpreter)"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def run_child(group: str, names: list[str], state: Path, dry_run: bool) -> int:
    """Run ``names`` (sections of ``group``) in this process, rewriting ``state`` after each."""
    import torch

    plan = DRY_PLAN if dry_run else GPU_PLAN
    device = torch.device("cuda" if not dry_run else "cpu")
    results = json.loads(state.read_text())
    ctx = Context(plan, device, results)
    for name in names:
        rec: dict = {}
        entry = {"status": "running", "group": group, "data": rec}
        results["sections"][name] = entry
        _write_json(state, results)
        start = time.perf_counter()
        try:
            with time_box(plan.budgets[name]):
                SECTION_FUNCTIONS[name](ctx, rec)
            entry["status"] = "ok"
        except SectionTimeout as exc:
            entry.update(status="timeout", error=str(exc))
        except Exception as exc:  # recorded; the run goes on
            # A time box expiring inside an interpreted kernel comes back wrapped by the interpreter.
            status = "timeout" if "SectionTimeout" in repr(exc) else "error"
            entry.update(status=status, error=_one_line(exc), traceback=_tail(traceback.format_exc(), 2000))
        entry["seconds"] = time.perf_counter() - start
        _write_json(state, results)
        if entry["status"] != "ok" and device.type == "cuda" and not _cuda_alive():
            return 3  # a sticky CUDA error: the parent goes on in a fresh process
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_alive() -> bool:
    import torch

    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except Exception:
        return False


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def evaluate(results: dict) -> list[dict]:
    """Each target: its measured value (None when not measured) and pass/miss."""
    sections = results["sections"]

    def data(name: str) -> dict:
        return sections.get(name, {}).get("data", {})

    attention = [r["engine_tflops"] for r in data("attention").get("rows", [])
                 if r.get("head_dim") == 128 and 1024 <= r.get("seqlen", 0) <= 4096 and "engine_tflops" in r]
    values = {
        "attention_d128": min(attention) if len(attention) == 3 else None,
        "mfu_uniform_512": data("encode_uniform").get("mfu"),
        "skewed_vs_transformers": data("transformers").get("engine_over_transformers"),
        "query_vs_weight_read": data("encode_query").get("graphs", {}).get("vs_weight_read"),
        "norm_vs_copy": data("memory_kernels").get("rms_norm_residual", {}).get("fraction_of_copy"),
        "pooling_vs_copy": data("memory_kernels").get("norm_pool_mean", {}).get("fraction_of_copy"),
        "peak_memory_16k": data("encode_memory").get("above_weights_gib"),
    }
    out = []
    for name, what, op, threshold in TARGETS:
        value = values[name]
        verdict = "not measured" if value is None else (
            "pass" if (value >= threshold if op == ">=" else value <= threshold) else "miss")
        out.append(dict(name=name, what=what, target=f"{op} {threshold:g}", value=value, verdict=verdict))
    return out


def markdown(results: dict) -> str:
    """The RESULTS.md section of a run."""
    meta, sections = results["meta"], results["sections"]

    def data(name: str) -> dict:
        return sections.get(name, {}).get("data", {})

    env = data("env")
    lines = [f"## GPU check: {env.get('device', meta.get('device', '?'))}, {meta['date']}, commit `{meta['commit']}`", ""]
    if meta["dry_run"]:
        lines += ["**Dry run on a CPU (tiny shapes, Triton interpreter): no figure below measures anything.**", ""]
    lines += [f"- Command: `{meta['command']}`; {meta['elapsed_s']:.0f} s wall clock.",
              f"- torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, transformers {env.get('transformers', '?')}.",
              f"- Ceilings measured in this run: matrix product {_fmt(env.get('matmul_tflops'))} TFLOP/s "
              f"({str(meta['dtype'])}), copy {_fmt(env.get('copy_gbps'))} GB/s (read + write).", ""]
    lines += ["| target | measured | goal | verdict |", "| --- | ---: | ---: | --- |"]
    for t in results.get("targets", []):
        lines.append(f"| {t['what']} | {_fmt(t['value'])} | {t['target']} | {t['verdict']} |")
    lines.append("")
    status = [f"{name}: {s['status']}" + (f" ({s.get('error', '')[:160]})" if s["status"] != "ok" else "")
              for name, s in sections.items()]
    lines += ["Sections: " + "; ".join(status) + ".", ""]
    tests = data("tests")
    if tests.get("counts"):
        c = tests["counts"]
        lines.append(f"GPU-only tests: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped, {c['missing_dependency']} not collected (dependency absent here).")
        lines += [f"- FAILED {f}" for f in tests.get("failures", [])]
        lines.append("")
    rows = data("attention").get("rows", [])
    if rows:
        lines += ["Attention, TFLOP/s (16k tokens per call, equal lengths; engine / SDPA / varlen_attn):", "",
                  "| head dim | " + " | ".join(str(L) for L in sorted({r["seqlen"] for r in rows})) + " |",
                  "| --- |" + " ---: |" * len({r["seqlen"] for r in rows})]
        for d in sorted({r["head_dim"] for r in rows}):
            cells = []
            for L in sorted({r["seqlen"] for r in rows}):
                r = next((r for r in rows if r["head_dim"] == d and r["seqlen"] == L), {})
                cells.append(" / ".join(_fmt(r.get(k)) for k in ("engine_tflops", "sdpa_tflops", "varlen_attn_tflops")))
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    mem = data("memory_kernels")
    if mem:
        lines += ["| memory-bound kernel | GB/s | of copy |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {_fmt(v['gbps'])} | {v['fraction_of_copy']:.0%} |" for k, v in mem.items() if isinstance(v, dict)]
        lines.append("")
    build, uni, skew, query = data("encode_build"), data("encode_uniform"), data("encode_skewed"), data("encode_query")
    if build:
        lines.append(f"Encode model: {meta['model']}, weights {_fmt(build.get('weights_gib'))} GiB; warm-up "
                     f"{_fmt(build.get('warmup_s'))} s, {build.get('graphs_captured', 0)} graphs captured "
                     f"({_fmt(build.get('graph_memory_gib'))} GiB).")
    for label, d in (("uniform", uni), ("skewed", skew)):
        if d:
            lines.append(f"- {label} x {d['inputs']} ({d['tokens']:,} tokens): {d['tokens_per_s']:,.0f} tokens/s, "
                         f"{d['tflops']:.1f} TFLOP/s useful, MFU {d['mfu']:.0%}.")
    hf = data("transformers")
    if hf.get("tokens_per_s"):
        lines.append(f"- transformers LLM2Vec-style on the skewed mix: {hf['tokens_per_s']:,.0f} tokens/s "
                     f"({hf['padded_tokens']:,} tokens computed with padding), engine / transformers "
                     f"{_fmt(hf.get('engine_over_transformers'))}x; agreement min cosine {hf['agreement_min_cosine']:.5f}.")
    if query:
        for label in ("graphs", "eager"):
            if label in query:
                q = query[label]
                lines.append(f"- one {query['query_tokens']}-token query, "
                             f"{label}: median {q['median_ms']:.2f} ms, p99 {q['p99_ms']:.2f} ms "
                             f"({q['vs_weight_read']:.2f}x the {query['weight_read_ms']:.2f} ms to read the weights once).")
    memd = data("encode_memory")
    if memd.get("above_weights_gib") is not None:
        lines.append(f"- {memd['tokens']:,} tokens per forward: peak {memd['peak_gib']:.2f} GiB, "
                     f"{memd['above_weights_gib']:.2f} GiB above the weights.")
    bd = data("breakdown")
    if bd.get("per_layer_ms"):
        p, f = bd["per_layer_ms"], bd["fractions"]
        lines.append(f"- per layer at {bd['tokens']:,} tokens: matrix products {p['matmul']:.2f} ms ({f['matmul']:.0%}), "
                     f"attention {p['attention']:.2f} ms ({f['attention']:.0%}), element-wise and the rest "
                     f"{p['elementwise']:.2f} ms ({f['elementwise']:.0%}).")
    lines.append("")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on a CPU: tiny shapes, the Triton interpreter")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="directory for the results")
    parser.add_argument("--sections", default="", help="comma-separated subset of: " + ", ".join(s for s, _ in SECTIONS))
    parser.add_argument("--commit", help="the commit to name the results by (default: git rev-parse; "
                        "give it where the tree was copied without .git)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child, args.sections.split(","), args.state, args.dry_run)
    if not args.dry_run and not _has_cuda():
        print("gpu_check: no CUDA device here; on a CPU run `python -m benchmarks.gpu_check --dry-run`", file=sys.stderr)
        return 2
    wanted = [s for s, _ in SECTIONS] if not args.sections else args.sections.split(",")
    unknown = sorted(set(wanted) - {s for s, _ in SECTIONS})
    if unknown:
        print(f"gpu_check: unknown sections {unknown}; known: {[s for s, _ in SECTIONS]}", file=sys.stderr)
        return 2
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    date = datetime.date.today().isoformat()
    commit = args.commit or _commit()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{'dryrun' if args.dry_run else 'gpu'}-{date}-{commit}"
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    shape = plan.model
    results: dict = {
        "meta": dict(date=date, commit=commit, dry_run=args.dry_run, dtype=str(plan.dtype).removeprefix("torch."),
                     command="python -m benchmarks.gpu_check" + (" --dry-run" if args.dry_run else ""),
                     model=f"Mistral-7B shape: hidden {shape['hidden_size']}, {shape['num_heads']}/{shape['num_kv_heads']} "
                           f"heads, head_dim {shape['head_dim']}, intermediate {shape['intermediate_size']}, "
                           f"{plan.layers} layers", elapsed_s=0.0),
        "sections": {},
    }
    start = time.perf_counter()

    def save() -> None:
        results["meta"]["elapsed_s"] = time.perf_counter() - start
        results["targets"] = evaluate(results)
        _write_json(json_path, results)
        md_path.write_text(markdown(results))

    state = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "state.json"
    order = [(s, "bench" if args.dry_run and g != "tests" else g) for s, g in SECTIONS if s in wanted]
    i = 0
    while i < len(order):
        name, group = order[i]
        if group == "tests":
            rec: dict = {}
            entry = results["sections"][name] = {"status": "running", "group": group, "data": rec}
            t0 = time.perf_counter()
            try:
                run_tests(plan, args.dry_run, plan.budgets[name], rec)
                entry["status"] = "ok"
            except SectionTimeout as exc:
                entry.update(status="timeout", error=str(exc))
            except Exception as exc:
                entry.update(status="error", error=_one_line(exc))
            entry["seconds"] = time.perf_counter() - t0
            i += 1
            save()
            continue
        # The run of consecutive sections of this group goes to one child process.
        names = []
        while i < len(order) and order[i][1] == group:
            names.append(order[i][0])
            i += 1
        while names:
            _write_json(state, results)
            budget = sum(plan.budgets[n] for n in names) + 60  # + process start and imports
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", group, "--sections", ",".join(names),
                   "--state", str(state)] + (["--dry-run"] if args.dry_run else [])
            try:
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=budget)
                died = proc.returncode not in (0, 3)
                tail = _tail(proc.stdout + proc.stderr, 1500)
            except subprocess.TimeoutExpired:
                died, tail = True, f"the {group} process ran past {budget:.0f} s and was killed"
            child = json.loads(state.read_text())["sections"]
            done = []
            for n in names:
                if n in child and child[n]["status"] != "running":
                    results["sections"][n] = child[n]
                    done.append(n)
                elif n in child:  # the process died inside this section
                    results["sections"][n] = {**child[n], "status": "error", "error": "the process died here: " + _one_line(tail)}
                    done.append(n)
                    break
                else:
                    break
            if not done and died:
                for n in names:
                    results["sections"][n] = {"status": "error", "group": group, "error": "did not start: " + _one_line(tail)}
                done = names
            names = [n for n in names if n not in done]
            save()
    save()
    failed = [n for n, s in results["sections"].items() if s["status"] != "ok"]
    print(markdown(results))
    print(f"gpu_check: results in {json_path} and {md_path}" + (f"; sections not ok: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
