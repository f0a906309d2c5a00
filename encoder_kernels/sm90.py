"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU, and check what ptxas says.

No GPU runs this project's tests, so the compile gate (``tests/encoder_kernels/test_compile_gate.py``) proves
here what a CPU can prove: every kernel variant the engine may launch on an H100/H200 compiles, and
compiles cleanly. A variant is clean when ptxas reports no register spill (spill stores and loads
both 0), its shared memory fits the 232,448 bytes (227 KB) an sm_90 block may use, and, for a
float16/bfloat16 attention tile of 64 rows or more, its PTX uses Hopper's tensor-core instruction
(``wgmma.mma_async``) rather than Ampere's ``mma.sync``.

The recipe, with no GPU and no CUDA driver: bind the launch's arguments with the JIT function's own
binder (``create_function_from_signature(fn.signature, fn.params, backend)`` then ``fn._pack_args``:
the same specialisation a launch gets: dtypes, 16-byte alignment, integers equal to 1 or divisible by
16), build ``ASTSource(fn, signature, constexprs, attrs)``, ``triton.compile`` it for
``GPUTarget("cuda", 90, 32)``, and read Triton's own ptxas log (it runs ptxas with ``-v
--gpu-name=sm_90a``) for registers and spills; ``metadata.shared`` is the shared memory.

What differs on the GPU machines' triton 3.6 (this file runs on the installed triton, 3.9 here):
- ptxas: 3.9's bundled CUDA 12.9 ptxas rejects the PTX 3.9 emits, so 3.9 picks its bundled 13.x
  ("ptxas-blackwell") for sm_90 and passes ``--regAllocOptLevel=2``; 3.6 uses its 12.8 ptxas without
  that flag. Register counts can differ by a few between them; a tile close to the 255-register
  ceiling on one may spill on the other, which is why the tuning spaces leave the tight ones out.
- 3.9 warns that FP fusion will default to off in 3.10 (``TRITON_DEFAULT_FP_FUSION``); 3.6 fuses by
  default. The attention kernel writes its fused multiply-add (the softmax scale) as ``tl.fma``, so
  it does not depend on that default.
- ``tl.range(warp_specialize=True)`` is a silent no-op on sm_90 in 3.6 (Blackwell only); no kernel
  here relies on it.
- Where a triton lacks the ``dump_ptxas_log`` knob, this module runs the same ptxas with ``-v`` on the
  PTX itself.

Registry: :data:`GATE` maps a kernel's name to a function returning its :class:`Variant` list at the
shapes of Mistral-7B (hidden 4096, 32 heads, 8 kv heads, head_dim 128, intermediate 14336) and, for
head_dim 256, Gemma-2. Adding a kernel to the gate is one decorated function::

    @gate_entry("my_kernel")
    def _my_kernel() -> list[Variant]:
        from encoder_kernels import mine
        return [Variant("my_kernel/bf16", mine._my_kernel, (x, y, n), {"BLOCK": 1024, "num_warps": 4})]

Command line (the gate test runs this in subprocesses, without ``TRITON_INTERPRET``)::

    python -m encoder_kernels.sm90 [--jobs 2] [--only SUBSTRING] [--json PATH] [--list]

Workers claim variants from a shared directory (heaviest first), each compiling into a fresh
TRITON_CACHE_DIR so that every variant really compiles, as in a clean CI checkout.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

SM90_SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (227 KB)
HALF_DTYPES = ("float16", "bfloat16")

# Mistral-7B: hidden 4096, 32 q heads, 8 kv heads, head_dim 128, intermediate 14336.
# Gemma-2 9B: hidden 3584, 16 q heads, 8 kv heads, head_dim 256.
MISTRAL_7B = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "intermediate": 14336}
GEMMA2_9B = {"hidden": 3584, "heads": 16, "kv_heads": 8, "head_dim": 256, "intermediate": 14336}
QWEN3_8B = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "intermediate": 12288}
QWEN3_06B = {"hidden": 1024, "heads": 16, "kv_heads": 8, "head_dim": 128, "intermediate": 3072}
TOKENS = 4099  # a packed batch: an odd count, as batches usually are (integer specialisation)


@dataclass(frozen=True)
class Variant:
    """One compilation: ``kernel`` (a JIT function, or an autotuner wrapping one) bound to ``args``
    (its positional runtime arguments, as the launcher passes them: CPU tensors stand in for CUDA
    ones, only their dtype and alignment matter) and ``constexprs`` (compile-time arguments plus
    ``num_warps`` / ``num_stages``). ``needs_wgmma``: the PTX must use wgmma."""

    name: str
    kernel: Any
    args: tuple
    constexprs: dict
    needs_wgmma: bool = False
    cost: float = 1.0  # relative compile time, to start the heaviest first


@dataclass
class Report:
    name: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    wgmma: bool | None = None
    needs_wgmma: bool = False
    seconds: float = 0.0
    error: str | None = None
    ptxas: str = field(default="", repr=False)

    def problems(self) -> list[str]:
        """What makes this variant unclean; empty when it is clean."""
        if self.error is not None:
            return [f"compile error: {self.error}"]
        found = []
        if self.spill_stores is None or self.spill_loads is None or self.registers is None:
            found.append("no register / spill report in the ptxas log")
        elif self.spill_stores or self.spill_loads:
            found.append(f"spills registers ({self.spill_stores} bytes stored, {self.spill_loads} loaded; "
                         f"{self.registers} registers)")
        if self.shared is None or self.shared > SM90_SHARED_LIMIT:
            found.append(f"shared memory {self.shared} bytes exceeds the sm_90 limit of {SM90_SHARED_LIMIT}")
        if self.needs_wgmma and not self.wgmma:
            found.append("a float16/bfloat16 tile of >= 64 rows that does not use wgmma")
        return found


GATE: dict[str, Callable[[], list[Variant]]] = {}


def gate_entry(name: str) -> Callable[[Callable[[], list[Variant]]], Callable[[], list[Variant]]]:
    """Register a function returning a kernel's variants under ``name``."""

    def register(fn: Callable[[], list[Variant]]) -> Callable[[], list[Variant]]:
        if name in GATE:
            raise ValueError(f"gate entry {name!r} registered twice")
        GATE[name] = fn
        return fn

    return register


def all_variants(only: str | None = None) -> list[Variant]:
    variants = [v for build in GATE.values() for v in build()]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate variant names: {sorted({n for n in names if names.count(n) > 1})}")
    return [v for v in variants if only is None or only in v.name]


# ---------------------------------------------------------------------------------------------------
# Compiling one variant
# ---------------------------------------------------------------------------------------------------


def ptxas_path() -> str:
    """The ptxas triton itself runs for sm_90; FileNotFoundError with the reason if it has none."""
    from triton.backends.nvidia import compiler

    tool = compiler.get_ptxas(90)
    path = getattr(tool, "path", None)
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"triton's ptxas for sm_90 was not found (got {path!r}); the compile gate "
                                "needs the ptxas bundled with triton (or TRITON_PTXAS_BLACKWELL_PATH / "
                                "TRITON_PTXAS_PATH pointing at one)")
    return path


def _parse_ptxas(log: str, report: Report) -> None:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs:
        report.registers = max(int(r) for r in regs)
    if spills:
        report.spill_stores = sum(int(s) for s, _ in spills)
        report.spill_loads = sum(int(lo) for _, lo in spills)


def compile_variant(v: Variant) -> Report:
    """Compile ``v`` for sm_90 and collect ptxas' registers and spills, shared memory and wgmma use."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    report = Report(v.name, needs_wgmma=v.needs_wgmma)
    fn = v.kernel
    while not hasattr(fn, "_pack_args"):  # autotuner (or heuristics) -> the JIT function
        fn = fn.fn
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    started = time.perf_counter()
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*v.args, **v.constexprs)
        options, signature, constexprs, attrs = fn._pack_args(backend, v.constexprs, bound, specialization, options)
        src = ASTSource(fn, signature, constexprs, attrs)
        log = io.StringIO()
        has_knob = hasattr(knobs.nvidia, "dump_ptxas_log")
        with contextlib.ExitStack() as stack:
            if has_knob:
                stack.enter_context(knobs.nvidia.scope())
                knobs.nvidia.dump_ptxas_log = True
                stack.enter_context(contextlib.redirect_stdout(log))
            kernel = triton.compile(src, target=target, options=options.__dict__)
        text = log.getvalue()
        if "registers" not in text:  # an older triton, or a cache hit: run the same ptxas ourselves
            text = _run_ptxas(kernel.asm["ptx"])
        report.ptxas = text
        _parse_ptxas(text, report)
        report.shared = int(kernel.metadata.shared)
        report.wgmma = "wgmma.mma_async" in kernel.asm["ptx"]
    except Exception as e:  # noqa: BLE001 - every failure is a finding of the gate, reported by name
        report.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def _run_ptxas(ptx: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas_path(), "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=True)
        return done.stderr + done.stdout


# ---------------------------------------------------------------------------------------------------
# The registry: every kernel at the 7B shapes
# ---------------------------------------------------------------------------------------------------


def _empty(*shape: int, dtype: str = "bfloat16"):
    import torch

    return torch.empty(*shape, dtype=getattr(torch, dtype))


def attention_variant(
    head_dim: int, dtype: str, config, *, causal: bool = False, softcap: bool = False, window: bool = False,
    group: int | None = None,
) -> Variant:
    """The attention kernel as ``varlen_attention`` launches it for a fused qkv projection of the model
    with ``head_dim`` (Gemma-2's heads for 256, Mistral-7B's otherwise), pinned to ``config``."""
    from encoder_kernels import attention

    shape = GEMMA2_9B if head_dim == 256 else MISTRAL_7B
    n_kv = shape["kv_heads"]
    n_heads = n_kv * group if group is not None else shape["heads"]
    qkv = _empty(16, (n_heads + 2 * n_kv) * head_dim, dtype=dtype)
    q = qkv[:, : n_heads * head_dim].view(16, n_heads, head_dim)
    k = qkv[:, n_heads * head_dim : (n_heads + n_kv) * head_dim].view(16, n_kv, head_dim)
    v = qkv[:, (n_heads + n_kv) * head_dim :].view(16, n_kv, head_dim)
    out = _empty(16, n_heads, head_dim, dtype=dtype)
    work = _empty(64, dtype="int32")
    block_d = attention._block_d(head_dim)
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    flags = "".join(f"/{name}" for name, on in (("causal", causal), ("softcap", softcap), ("window", window)) if on)
    name = (f"attention/{dtype}/d{head_dim}/g{n_heads // n_kv}/{bm}x{bn}w{config.num_warps}s{config.num_stages}"
            f"{flags}")
    args = (q, k, v, out, work, 0.18, 0.01 if softcap else 0.0, 4095, 4095, n_kv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            1024)
    constexprs = dict(
        GROUP=n_heads // n_kv, HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
        CAUSAL=causal, SOFTCAP=softcap, WINDOW=window,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    cost = bm * bn * block_d / (64 * 64 * 128)
    return Variant(name, attention._varlen_attention_kernel, args, constexprs,
                   needs_wgmma=dtype in HALF_DTYPES and bm >= 64, cost=cost)


ATTENTION_HEAD_DIMS = (64, 80, 96, 128, 256)
# float32 attention is refused on a GPU (encoder_kernels/attention.py says why), so it has no GPU tiles.
ATTENTION_DTYPES = ("float16", "bfloat16")
# The flag variants compiled on top of the full tuning spaces (which run with the flags off), in
# bfloat16, each at the largest tile of its own space (the tile with the least register headroom):
# all three flags at every head-dim class (64; 80 and 96 share one masked 128-wide tile, so 96
# stands for both; 128; 256), causal alone (e5-mistral, Qwen3: 128; and 256) and soft-cap with window
# (Gemma-2: 256; and 128). Every flag set at every config and dtype would be 14x the flag-off
# variants, far past the gate's time budget; a flag changes the loop structure and the mask math,
# not the tile.
ALL_FLAGS = dict(causal=True, softcap=True, window=True)
ATTENTION_FLAG_VARIANTS = (
    (64, ALL_FLAGS), (96, ALL_FLAGS), (128, ALL_FLAGS), (256, ALL_FLAGS),
    (128, dict(causal=True)), (256, dict(causal=True)),
    (128, dict(softcap=True, window=True)), (256, dict(softcap=True, window=True)),
)


@gate_entry("attention")
def _attention() -> list[Variant]:
    from encoder_kernels import attention

    variants = []
    for dtype in ATTENTION_DTYPES:
        for head_dim in ATTENTION_HEAD_DIMS:
            for config in attention.gpu_tuning_space(head_dim):
                variants.append(attention_variant(head_dim, dtype, config))
    for head_dim, flags in ATTENTION_FLAG_VARIANTS:
        variants.append(attention_variant(head_dim, "bfloat16", attention.gpu_tuning_space(head_dim, **flags)[0], **flags))
    # One q head per kv head (no grouped-query packing): the row -> (token, head) math degenerates.
    variants.append(attention_variant(128, "bfloat16", attention.gpu_tuning_space(128)[0], group=1))
    return variants


@gate_entry("rms_norm")
def _rms_norm() -> list[Variant]:
    import triton

    from encoder_kernels import norms

    variants = []
    # The offset (Gemma's 1 + weight) is one constant: with and without a residual. (float32 would
    # only matter to direct callers: the engine runs float32 on the reference backend on a GPU.)
    for dtype, has_residual, offset in (("bfloat16", False, 0.0), ("bfloat16", True, 1.0)):
        hidden = MISTRAL_7B["hidden"]
        x, r, y, h = (_empty(TOKENS, hidden, dtype=dtype) for _ in range(4))
        w = _empty(hidden, dtype=dtype)
        block_h = triton.next_power_of_2(hidden)
        block_t, num_warps = norms._launch_settings(block_h)
        variants.append(Variant(
            f"rms_norm/{dtype}/h{hidden}/residual={has_residual}/offset={offset}", norms._rms_norm_kernel,
            (x, r, w, y, h, 1e-6, TOKENS, hidden, hidden, hidden, hidden, hidden),
            dict(HAS_RESIDUAL=has_residual, OFFSET=offset, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=num_warps),
            cost=0.2))
    return variants


@gate_entry("rotary")
def _rotary() -> list[Variant]:
    import triton

    from encoder_kernels import rotary

    variants = []
    # Rotary alone (Mistral, Gemma-2) and with Qwen3's q/k RMSNorm fused (QK_NORM; Qwen3-8B and 0.6B).
    for shape, qk_norm in ((MISTRAL_7B, False), (GEMMA2_9B, False), (QWEN3_8B, True), (QWEN3_06B, True)):
        heads, n_kv, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
        qkv = _empty(TOKENS, (heads + 2 * n_kv) * head_dim)
        q = qkv[:, : heads * head_dim].view(TOKENS, heads, head_dim)
        k = qkv[:, heads * head_dim : (heads + n_kv) * head_dim].view(TOKENS, n_kv, head_dim)
        half = head_dim // 2
        cos, sin = _empty(TOKENS, half, dtype="float32"), _empty(TOKENS, half, dtype="float32")
        q_weight, k_weight = _empty(head_dim), _empty(head_dim)
        block_hq, block_half = triton.next_power_of_2(heads), triton.next_power_of_2(half)
        variants.append(Variant(
            f"rotary/bfloat16/h{heads}kv{n_kv}d{head_dim}" + ("/qk_norm" if qk_norm else ""), rotary._rotary_kernel,
            (q, k, cos, sin, q_weight, k_weight, 1e-6, heads, n_kv, half, q.stride(0), q.stride(1), k.stride(0),
             k.stride(1), cos.stride(0), sin.stride(0)),
            # num_warps as rotary_ picks it on a GPU
            dict(BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(n_kv), BLOCK_HALF=block_half, QK_NORM=qk_norm,
                 num_warps=max(1, min(8, block_hq * block_half // 256))),
            cost=0.2))
    return variants


@gate_entry("pooling")
def _pooling() -> list[Variant]:
    import triton

    from encoder_kernels import pooling

    hidden = MISTRAL_7B["hidden"]
    block_h = triton.next_power_of_2(hidden)
    block_t, num_warps = pooling._launch_settings(block_h)
    variants = []
    # (mode, normalize, final norm fused, pending residual, per-token weights): what the engine
    # launches (the fused final norm with its residual, for a span and for one row; per-token
    # weights where special tokens are skipped), and plain pooling. weighted_mean differs from mean
    # by one multiply per row.
    for mode, normalize, has_norm, has_residual, has_weights in (
        ("mean", True, False, False, False),
        ("mean", True, True, True, True),
        ("last", True, True, True, False),
    ):
        hidden_states, residual = _empty(TOKENS, hidden), _empty(TOKENS, hidden)
        weight, out = _empty(hidden), _empty(64, hidden, dtype="float32")
        starts, ends = _empty(64, dtype="int64"), _empty(64, dtype="int64")
        weights = _empty(TOKENS, dtype="float32")
        variants.append(Variant(
            f"pooling/bfloat16/h{hidden}/{mode}/normalize={normalize}/norm={has_norm}/residual={has_residual}"
            f"/weights={has_weights}",
            pooling._segment_pool_kernel,
            (hidden_states, residual, weight, weights, out, starts, ends, 1e-6, hidden, hidden, hidden, hidden),
            dict(MODE=pooling._MODE_IDS[mode], NORMALIZE=normalize, HAS_NORM=has_norm, HAS_RESIDUAL=has_residual,
                 HAS_WEIGHTS=has_weights, OFFSET=0.0, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=num_warps),
            cost=0.3))
    return variants


@gate_entry("gated_activation")
def _gated_activation() -> list[Variant]:
    import triton

    from encoder_kernels import activations

    n_cols = MISTRAL_7B["intermediate"]
    gate_up, out = _empty(TOKENS, 2 * n_cols), _empty(TOKENS, n_cols)
    return [
        Variant(f"gated_activation/bfloat16/i{n_cols}/{activation}", activations._gated_activation_kernel,
                (gate_up, out, n_cols, gate_up.stride(0), out.stride(0)),
                # BLOCK and num_warps as gated_activation picks them
                dict(ACTIVATION=activation, BLOCK=min(1024, triton.next_power_of_2(n_cols)), num_warps=4),
                cost=0.1)
        for activation in activations.ACTIVATIONS
    ]


# ---------------------------------------------------------------------------------------------------
# Command line: workers claim variants from a shared directory
# ---------------------------------------------------------------------------------------------------


def _work(directory: Path, only: str | None) -> None:
    """Compile every unclaimed variant (heaviest first), one JSON line per report."""
    variants = sorted(all_variants(only), key=lambda v: -v.cost)
    claims = directory / "claims"
    with open(directory / f"reports-{os.getpid()}.jsonl", "a") as sink:
        for i, v in enumerate(variants):
            try:
                os.close(os.open(claims / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            sink.write(json.dumps(asdict(compile_variant(v))) + "\n")
            sink.flush()


def run_gate(jobs: int = 2, only: str | None = None, timeout: float | None = None) -> list[Report]:
    """Compile every registered variant in ``jobs`` worker processes; the reports in registry order."""
    ptxas_path()  # fail early, with the reason, if there is no ptxas
    with tempfile.TemporaryDirectory(prefix="sm90-gate-") as tmp:
        directory = Path(tmp)
        (directory / "claims").mkdir()
        env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(directory / "cache")  # cold, as in CI: every variant compiles
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)
        command = [sys.executable, "-m", "encoder_kernels.sm90", "--worker", str(directory)] + (["--only", only] if only else [])
        root = Path(__file__).resolve().parent.parent
        workers = [subprocess.Popen(command, env=env, cwd=root) for _ in range(max(1, jobs))]
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            names = [v.name for v in all_variants(only)]  # while the workers start
            for w in workers:
                w.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        by_name = {}
        for path in directory.glob("reports-*.jsonl"):
            for line in path.read_text().splitlines():
                data = json.loads(line)
                by_name[data["name"]] = Report(**data)
        failed = [w.returncode for w in workers if w.returncode]
        return [by_name.get(n) or Report(n, error=f"not compiled (worker exit codes {failed or 'all 0'})")
                for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m encoder_kernels.sm90", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--only", help="only variants whose name contains this")
    parser.add_argument("--json", type=Path, help="write the reports here")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--timeout", type=float, help="stop the workers after this many seconds")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET: the interpreter has no compiler", file=sys.stderr)
        return 2
    if args.worker:
        _work(args.worker, args.only)
        return 0
    if args.list:
        for v in all_variants(args.only):
            print(v.name)
        return 0
    try:
        started = time.perf_counter()
        reports = run_gate(args.jobs, args.only, args.timeout)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = 0
    for r in reports:
        problems = r.problems()
        bad += bool(problems)
        status = "; ".join(problems) if problems else "ok"
        print(f"{r.name:<72} regs {r.registers!s:>4}  spill {r.spill_stores!s:>4}/{r.spill_loads!s:<4} "
              f"smem {r.shared!s:>6}  wgmma {r.wgmma!s:<5} {r.seconds:6.1f}s  {status}")
    print(f"{len(reports)} variants, {bad} unclean, {time.perf_counter() - started:.0f}s wall with {args.jobs} jobs")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
