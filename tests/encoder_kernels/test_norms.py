"""rms_norm (Triton) against rms_norm_reference: with and without the fused residual add, Gemma's
offset, odd token counts and a hidden size that is not a power of two. Outputs NaN-poisoned."""
from __future__ import annotations

import pytest
import torch
from _compare import DEVICE, assert_close, needs_cuda, poisoned

from encoder_kernels.norms import rms_norm, rms_norm_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(shape, dtype, seed, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype=dtype, device=DEVICE)


def check(n_rows: int, hidden: int, dtype: torch.dtype, offset: float, with_residual: bool,
          weight_dtype: torch.dtype | None = None, seed: int = 0) -> None:
    # Rows are a column slice of a wider buffer: the kernel must honour the row stride.
    x = rand((n_rows, hidden + 16), dtype, seed)[:, :hidden]
    residual = rand((n_rows, hidden), dtype, seed + 1) if with_residual else None
    weight = rand((hidden,), weight_dtype or dtype, seed + 2, scale=0.1, shift=0.0 if offset else 1.0)
    out, summed_out = poisoned(x.shape, dtype), poisoned(x.shape, dtype) if with_residual else None
    y, summed = rms_norm(x, weight, 1e-6, offset, residual, out=out, residual_out=summed_out)
    assert y is out
    res64 = residual.double() if with_residual else None
    y64, summed64 = rms_norm_reference(x.double(), weight.double(), 1e-6, offset, res64)
    torch_y, torch_summed = rms_norm_reference(x, weight, 1e-6, offset, residual)
    if with_residual:
        assert summed is summed_out
        assert_close(summed, summed64, torch_summed, name=f"rms_norm x + residual ({dtype})")
        # y is judged from the kernel's own rounded sum, as the reference computes y from its own.
        y64 = rms_norm_reference(summed.double(), weight.double(), 1e-6, offset)[0]
    else:
        assert summed is x, "without a residual the second output is x itself"
    assert_close(y, y64, torch_y, name=f"rms_norm y ({dtype}, offset={offset})")


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("hidden", [64, 72])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype: torch.dtype, hidden: int, offset: float, with_residual: bool) -> None:
    check(37, hidden, dtype, offset, with_residual, seed=hidden + int(offset))


@pytest.mark.parametrize("n_rows", [1, 7, 33])
def test_odd_token_counts_with_float32_weight(n_rows: int) -> None:
    check(n_rows, 72, torch.bfloat16, 0.0, True, weight_dtype=torch.float32, seed=n_rows)


def test_default_outputs_and_no_rows() -> None:
    x, r, w = rand((5, 64), torch.float16, 3), rand((5, 64), torch.float16, 4), rand((64,), torch.float16, 5)
    y, summed = rms_norm(x, w, 1e-5, 0.0, r)
    assert y.shape == summed.shape == x.shape and y.dtype == summed.dtype == x.dtype
    assert summed.data_ptr() not in (x.data_ptr(), r.data_ptr())
    y, summed = rms_norm(x[:0], w, 1e-5)
    assert y.shape == (0, 64)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w: rms_norm(x[0], w, 1e-6), r"\[tokens, hidden\]"),
        (lambda x, w: rms_norm(x, w[:-1], 1e-6), "weight must be"),
        (lambda x, w: rms_norm(x, w, 1e-6, residual=x[:, :-1]), "residual must be"),
        (lambda x, w: rms_norm(x, w, 1e-6, residual=x.half()), "residual must be"),
        (lambda x, w: rms_norm(x, w, 1e-6, residual_out=x.clone()), "only written when a residual"),
        (lambda x, w: rms_norm(x.t(), w[:9], 1e-6), "contiguous"),
        (lambda x, w: rms_norm(x.long(), w, 1e-6), "supported: float32"),
        (lambda x, w: rms_norm(x, w, 1e-6, out=x[:1]), "out must be"),
    ],
)
def test_bad_inputs_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(rand((9, 64), torch.float32, 6), rand((64,), torch.float32, 7))


@needs_cuda
@pytest.mark.parametrize("hidden", [3072, 4096, 5120])
def test_gpu_bfloat16_model_sizes(hidden: int) -> None:
    check(4099, hidden, torch.bfloat16, 1.0, True, seed=hidden)
    check(4099, hidden, torch.bfloat16, 0.0, False, seed=hidden + 1)
