"""Every command answers ``--help`` and usage errors at once: arguments are parsed before torch,
transformers or triton is imported (checked with ``python -X importtime``, which lists every module
a process imports), and usage errors share one format (``PROG: error: ...``, one line, exit 2)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# (module, the name its errors carry, its required arguments)
COMMANDS = [
    ("converters.hf2engine", "hf2engine", ["SRC", "OUT"]),
    ("engine.embed", "engine.embed", ["ENGINE_DIR", "INPUT", "--out", "DIR"]),
    ("engine.serve", "engine.serve", ["ENGINE_DIR"]),
    ("engine.train", "engine.train", ["mntp"]),
    ("engine.demo", "engine.demo", []),
]
HEAVY = ("torch", "transformers", "triton", "numpy", "tokenizers", "safetensors", "uvicorn", "fastapi", "ray",
         "pyarrow")


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _imported(stderr: str) -> set[str]:
    """Top-level names of the modules a ``-X importtime`` run imported."""
    found = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", stderr, flags=re.M)
    assert found, "no -X importtime lines: the check would prove nothing"
    return {name.split(".")[0] for name in found}


@pytest.mark.parametrize("module, name, required", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_imports_nothing_heavy(module, name, required):
    proc = _run(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python -m {module}"), proc.stdout[:200]
    assert "engine" in _imported(proc.stderr) or "converters" in _imported(proc.stderr)
    heavy = _imported(proc.stderr) & set(HEAVY)
    assert not heavy, f"python -m {module} --help imported {sorted(heavy)}"


@pytest.mark.parametrize("module, name, required", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_usage_error_is_one_line_and_exit_2(module, name, required):
    proc = _run(module, *required, "--no-such-flag")
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: ") and "--no-such-flag" in lines[0], lines
    assert not _imported(proc.stderr) & set(HEAVY)
    assert proc.stdout == ""
