"""The sm_90 compile gate: every kernel variant the engine may launch on an H100/H200 compiles for
Hopper on this CPU-only machine, without register spills, within sm_90's shared memory, and (for
float16/bfloat16 attention tiles of 64 rows or more) on wgmma. See encoder_kernels/sm90.py for the recipe and
what differs on the GPU machines' triton 3.6.

The compilation runs in ``python -m encoder_kernels.sm90`` subprocesses (two workers, one per core): the
Triton interpreter this test session runs under has no compiler. It compiles into a fresh Triton cache,
so every variant really compiles. Its reports are then kept under ``~/.cache/llm-encoder-engine/sm90``
(``$XDG_CACHE_HOME`` is honoured), keyed by the sha256 of every kernel source, the gate itself, the
triton version and the ptxas binary: a run with unchanged kernels reads them instead of compiling
again; a changed kernel, triton or ptxas compiles afresh. ``SM90_GATE_CACHE=0`` turns the cache off.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("triton's nvidia backend is not installed: there is no sm_90 compiler to gate with",
                allow_module_level=True)

from encoder_kernels import attention, sm90  # noqa: E402

# About 150 s on two idle cores; the bound is for a loaded machine, never a timing assertion.
GATE_TIMEOUT_S = 900


def _cached_reports_path() -> Path | None:
    """Where the reports of this exact gate (kernel sources, triton, ptxas) are kept; None when the
    cache is off."""
    if os.environ.get("SM90_GATE_CACHE", "1") == "0":
        return None
    import triton

    try:
        ptxas = Path(sm90.ptxas_path())
    except FileNotFoundError:
        return None  # the gate itself then fails, saying why
    key = hashlib.sha256(f"triton {triton.__version__}\n".encode())
    for source in sorted((ROOT / "encoder_kernels").glob("*.py")):
        key.update(source.name.encode() + b"\0" + source.read_bytes())
    key.update(str(ptxas).encode() + b"\0" + hashlib.sha256(ptxas.read_bytes()).digest())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "llm-encoder-engine" / "sm90" / f"{key.hexdigest()[:32]}.json"


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> tuple[list[sm90.Report], str]:
    cached = _cached_reports_path()
    if cached is not None and cached.is_file():
        return [sm90.Report(**r) for r in json.loads(cached.read_text())], f"(reports read from {cached})"
    out = tmp_path_factory.mktemp("sm90") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "encoder_kernels.sm90", "--jobs", "2", "--json", str(out), "--timeout", str(GATE_TIMEOUT_S)]
    # Its own session, so that the workers go too should this process have to stop it.
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=GATE_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the compile gate did not finish in {GATE_TIMEOUT_S + 60} s")
    if not out.exists():  # no ptxas, a crash: say why, never skip
        pytest.fail(f"the compile gate did not run (exit {proc.returncode}):\n{stderr[-4000:]}\n{stdout[-2000:]}")
    if cached is not None:  # a complete run: its reports hold for these exact sources, triton and ptxas
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(out, tmp)
        os.replace(tmp, cached)
    return [sm90.Report(**r) for r in json.loads(out.read_text())], stdout


def test_every_variant_compiles_cleanly_for_sm90(gate) -> None:
    reports, log = gate
    unclean = [f"{r.name}: {'; '.join(r.problems())}" for r in reports if r.problems()]
    assert not unclean, f"{len(unclean)} of {len(reports)} variants are not clean:\n" + "\n".join(unclean) + "\n\n" + log


def test_gate_covers_every_config_the_autotuner_may_launch(gate) -> None:
    """Every (head dim, dtype) tuning space in full with the flags off; with flags, the largest tile
    of each flagged space (a representative subset, see encoder_kernels/sm90.py); every other kernel,
    pooling with and without per-token weights."""
    compiled = {r.name for r in gate[0]}
    expected = {
        sm90.attention_variant(head_dim, dtype, config).name
        for dtype in ("float16", "bfloat16")
        for head_dim in (64, 80, 96, 128, 256)
        for config in attention.gpu_tuning_space(head_dim)
    }
    every_flag = dict(causal=True, softcap=True, window=True)
    for head_dim, flags in [(64, every_flag), (96, every_flag), (128, every_flag), (256, every_flag),
                            (128, dict(causal=True)), (256, dict(causal=True)),
                            (128, dict(softcap=True, window=True)), (256, dict(softcap=True, window=True))]:
        largest = attention.gpu_tuning_space(head_dim, **flags)[0]  # the least register headroom
        expected.add(sm90.attention_variant(head_dim, "bfloat16", largest, **flags).name)
    assert expected <= compiled, f"not compiled: {sorted(expected - compiled)}"
    for prefix in ("rms_norm/", "rotary/", "pooling/", "gated_activation/"):
        assert any(n.startswith(prefix) for n in compiled), prefix
    assert {"weights=True", "weights=False"} <= {n.rsplit("/", 1)[1] for n in compiled if n.startswith("pooling/")}
    assert {n.rsplit("/", 1)[1] for n in compiled if n.startswith("gated_activation/")} == {"silu", "gelu_tanh"}


# What ptxas -v prints (ptxas 13.x, sm_90a) for a clean and for a spilling kernel.
CLEAN_LOG = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 198 registers, used 1 barriers
"""
SPILLING_LOG = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    336 bytes stack frame, 420 bytes spill stores, 408 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 336 bytes cumulative stack size
"""


def test_report_names_each_problem() -> None:
    clean = sm90.Report("clean", shared=131072, wgmma=True, needs_wgmma=True)
    sm90._parse_ptxas(CLEAN_LOG, clean)
    assert (clean.registers, clean.spill_stores, clean.spill_loads) == (198, 0, 0) and clean.problems() == []

    spilling = sm90.Report("spilling", shared=131072, wgmma=True, needs_wgmma=True)
    sm90._parse_ptxas(SPILLING_LOG, spilling)
    assert spilling.problems() == ["spills registers (420 bytes stored, 408 loaded; 255 registers)"]

    too_big = sm90.Report("smem", shared=sm90.SM90_SHARED_LIMIT + 1, wgmma=False, needs_wgmma=True)
    sm90._parse_ptxas(CLEAN_LOG, too_big)
    problems = too_big.problems()
    assert len(problems) == 2 and "exceeds the sm_90 limit" in problems[0] and "wgmma" in problems[1]

    assert sm90.Report("no log", shared=0).problems() == ["no register / spill report in the ptxas log"]
    assert sm90.Report("broken", error="CompilationError: x").problems() == ["compile error: CompilationError: x"]


def test_missing_ptxas_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ptxas fails the gate with the reason (the fixture turns that exit into a test failure)."""
    from triton.backends.nvidia import compiler

    monkeypatch.setattr(compiler, "get_ptxas", lambda arch: type("Tool", (), {"path": "/nonexistent/ptxas"})())
    with pytest.raises(FileNotFoundError, match="ptxas for sm_90 was not found"):
        sm90.ptxas_path()
