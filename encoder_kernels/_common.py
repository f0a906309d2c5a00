"""What every kernel launcher checks the same way (where it may run, which dtypes, row layouts) and
how autotuned kernels keep their tuning across processes."""
from __future__ import annotations

import inspect
import os

import torch
import triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = 65536  # row kernels hold a whole [hidden] row in registers


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_launchable(device: torch.device) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"tensors on {device} need a GPU, or TRITON_INTERPRET=1 for the CPU interpreter")


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")


def check_rows(name: str, t: torch.Tensor) -> tuple[int, int]:
    """``t`` must be [tokens, hidden] of a supported dtype, contiguous along hidden (rows may be
    strided). Returns (tokens, hidden)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be [tokens, hidden], got shape {tuple(t.shape)}")
    check_dtype(name, t)
    n_rows, n_cols = t.shape
    if not 1 <= n_cols <= MAX_HIDDEN:
        raise ValueError(f"hidden size {n_cols} unsupported; the kernel handles 1..{MAX_HIDDEN}")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    return n_rows, n_cols


def autotune_cache_kwargs() -> dict:
    """``{"cache_results": True}`` where ``triton.autotune`` has it (triton >= 3.4: 3.9 here, 3.6 on
    the GPU machines), else ``{}``. Tuned configs are then written under TRITON_CACHE_DIR and reused by
    every later process with the same triton, GPU, kernel source, key and config list, so tuning runs
    once per machine rather than at the first call of every process. The interpreter never caches."""
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
