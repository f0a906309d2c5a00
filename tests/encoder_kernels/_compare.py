"""Shared helpers for the kernel tests: device choice, poisoned outputs, and the error-budget check.

The check follows ENGINEERING.md: a kernel is judged by its error against a float64 reference, next
to the error of the plain-PyTorch path run in the same dtype as the kernel:
``kernel_err <= 2 * torch_err + floor``.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU-sized shapes: too slow for the Triton interpreter on CPU")
bf16_dot_needs_cuda = pytest.mark.skipif(
    not CUDA, reason="bfloat16 tl.dot needs a GPU; the Triton interpreter's bf16 dot is wrong"
)

# Default absolute error floors: about one ulp of the dtype at magnitude 1.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def interpreter_allowance(dtype: torch.dtype, magnitude: float) -> float:
    """Extra absolute error allowed for a kernel that rounds to ``dtype`` under the interpreter.

    The Triton interpreter (triton 3.9) truncates float32 -> bfloat16 casts instead of rounding to
    nearest even (as GPUs and PyTorch do): up to one bf16 ulp where PyTorch loses half of one. On a
    GPU, and for other dtypes, the allowance is 0 and the plain 2x rule applies.
    """
    if INTERPRETING and dtype == torch.bfloat16:
        return torch.finfo(torch.bfloat16).eps * magnitude
    return 0.0


def poisoned(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device = DEVICE) -> torch.Tensor:
    """A NaN-filled output buffer: any element the kernel fails to write shows up as NaN."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def assert_close(
    kernel_out: torch.Tensor,
    ref64: torch.Tensor,
    torch_out: torch.Tensor | None = None,
    *,
    floor: float | None = None,
    rounds_to: torch.dtype | None = None,
    name: str = "kernel",
) -> None:
    """Assert ``max|kernel_out - ref64| <= 2 * max|torch_out - ref64| + floor``, verbosely.

    ``ref64``: the reference computed in float64 from the same (rounded) inputs; ``torch_out``: the
    plain-PyTorch path in the kernel's dtype (omitted: the bound is the floor alone). ``rounds_to``:
    the dtype the kernel rounds its results to, when not its output's (a bf16 norm inside a float32
    pooling), which picks the default floor and the :func:`interpreter_allowance` added to the floor.
    """
    assert kernel_out.shape == ref64.shape, f"{name}: shape {tuple(kernel_out.shape)} != {tuple(ref64.shape)}"
    dtype = kernel_out.dtype if rounds_to is None else rounds_to
    got = kernel_out.detach().to(torch.float64).cpu()
    ref = ref64.detach().to(torch.float64).cpu()
    floor = FLOOR.get(dtype, 1e-5) if floor is None else floor
    floor += interpreter_allowance(dtype, float(ref.abs().max()) if ref.numel() else 0.0)
    bad = ~torch.isfinite(got)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {got.numel()} outputs are not finite (first at "
        f"{tuple(bad.nonzero()[0].tolist())}); unwritten poisoned elements show up this way"
    )
    diff = (got - ref).abs()
    kernel_err = float(diff.max()) if diff.numel() else 0.0
    torch_err = 0.0
    if torch_out is not None:
        torch_diff = (torch_out.detach().to(torch.float64).cpu() - ref).abs()
        torch_err = float(torch_diff.max()) if torch_diff.numel() else 0.0
    bound = 2 * torch_err + floor
    if kernel_err > bound:
        worst = tuple(torch.unravel_index(diff.argmax(), diff.shape))
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name} ({dtype}, shape {tuple(got.shape)}): max error {kernel_err:.3e} vs float64 exceeds "
            f"2 x torch error {torch_err:.3e} + floor {floor:.1e} = {bound:.3e}; worst at {worst}: "
            f"kernel {float(got[worst]):.6g}, float64 reference {float(ref[worst]):.6g}; "
            f"{int((diff > bound).sum())} of {diff.numel()} elements out of bound"
        )


def cu_seqlens_of(lengths: list[int], device: torch.device = DEVICE) -> torch.Tensor:
    """int32 [batch + 1] prefix sums of ``lengths``."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)
