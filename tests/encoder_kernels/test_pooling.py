"""segment_pool and rms_norm_segment_pool (Triton) against their plain-PyTorch references.

Spans skip rows (as instruction tokens are skipped) and have lengths 1, 7, 33 and 2; the hidden size
72 is not a power of two. Outputs are NaN-poisoned before launch.
"""
from __future__ import annotations

import pytest
import torch
from _compare import DEVICE, assert_close, needs_cuda, poisoned

from encoder_kernels.norms import rms_norm_reference
from encoder_kernels.pooling import (
    POOLING_MODES,
    rms_norm_segment_pool,
    rms_norm_segment_pool_reference,
    segment_pool,
    segment_pool_reference,
)

HIDDEN = 72
# Rows [0, 57): four sequences whose pooled spans are 1, 7, 33 and 2 rows long, with gaps between.
STARTS = [0, 4, 12, 50]
ENDS = [1, 11, 45, 52]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def spans(starts=STARTS, ends=ENDS, dtype=torch.int64):
    return (torch.tensor(starts, dtype=dtype, device=DEVICE), torch.tensor(ends, dtype=dtype, device=DEVICE))


def rand(shape, dtype, seed, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_pool_matches_reference(dtype: torch.dtype, mode: str, normalize: bool) -> None:
    # A strided row layout (a column slice of a wider buffer) exercises the row-stride argument.
    hidden = rand((57, HIDDEN + 8), dtype, seed=POOLING_MODES.index(mode))[:, :HIDDEN]
    starts, ends = spans(dtype=torch.int32 if mode == "mean" else torch.int64)
    out = poisoned((4, HIDDEN), torch.float32)
    got = segment_pool(hidden, starts, ends, mode, normalize, out=out)
    assert got is out
    # Both sides accumulate the same (exactly widened) inputs in float32.
    ref = segment_pool_reference(hidden.double(), starts, ends, mode, normalize)
    assert_close(got, ref, floor=1e-5, name=f"segment_pool {dtype} {mode}")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_segment_pool_matches_reference(dtype: torch.dtype, mode: str, normalize: bool) -> None:
    seed = 10 + POOLING_MODES.index(mode)
    hidden = rand((57, HIDDEN), dtype, seed)
    residual = rand((57, HIDDEN), dtype, seed + 100)
    weight = rand((HIDDEN,), dtype, seed + 200, scale=0.2, shift=0.0)
    starts, ends = spans()
    for offset, res in ((0.0, None), (1.0, residual)):
        out = poisoned((4, HIDDEN), torch.float32)
        got = rms_norm_segment_pool(hidden, weight, 1e-6, starts, ends, mode, normalize,
                                    offset=offset, residual=res, out=out)
        assert got is out
        res64 = None if res is None else res.double()
        normed64 = rms_norm_reference(hidden.double(), weight.double(), 1e-6, offset, res64)[0]
        ref64 = segment_pool_reference(normed64, starts, ends, mode, normalize)
        torch_out = rms_norm_segment_pool_reference(hidden, weight, 1e-6, starts, ends, mode, normalize, offset, res)
        # The output is float32, but the normed rows are rounded to ``dtype`` inside: judge by dtype.
        assert_close(got, ref64, torch_out, floor=1e-5, rounds_to=dtype,
                     name=f"rms_norm_segment_pool {dtype} {mode} offset={offset}")


def test_default_output_and_zero_batch() -> None:
    hidden = rand((9, HIDDEN), torch.float16, seed=3)
    starts, ends = spans([0, 4], [4, 9])
    got = segment_pool(hidden, starts, ends)
    assert got.dtype == torch.float32 and got.shape == (2, HIDDEN)
    assert_close(got, segment_pool_reference(hidden, starts, ends), floor=1e-5)
    empty = segment_pool(hidden, *spans([], []))
    assert empty.shape == (0, HIDDEN) and empty.dtype == torch.float32


@pytest.mark.parametrize("fused", [False, True])
def test_empty_span_raises_before_launch(fused: bool) -> None:
    hidden = rand((9, HIDDEN), torch.float32, seed=4)
    starts, ends = spans([0, 5], [5, 5])
    out = poisoned((2, HIDDEN), torch.float32)
    with pytest.raises(ValueError, match="empty pooling span for sequence 1"):
        if fused:
            rms_norm_segment_pool(hidden, torch.ones(HIDDEN, device=DEVICE), 1e-6, starts, ends, out=out)
        else:
            segment_pool(hidden, starts, ends, out=out)
    assert out.isnan().all(), "nothing may be written when the spans are rejected"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda h: segment_pool(h, *spans([0], [10])), "exceed"),
        (lambda h: segment_pool(h, *spans([0], [3]), mode="max"), "unknown pooling mode"),
        (lambda h: segment_pool(h[0], *spans([0], [3])), r"\[tokens, hidden\]"),
        (lambda h: segment_pool(h.double(), *spans([0], [3])), "supported: float32"),
        (lambda h: segment_pool(h, *(s.float() for s in spans([0], [3]))), "int32 or int64"),
        (lambda h: segment_pool(h, *spans([0], [3]), out=torch.empty(1, HIDDEN, device=DEVICE)[:, :4]), "out must"),
        (lambda h: segment_pool(h.t().contiguous().t(), *spans([0], [3])), "contiguous"),
        (lambda h: rms_norm_segment_pool(h, torch.ones(HIDDEN - 1, device=DEVICE), 1e-6, *spans([0], [3])), "weight"),
        (lambda h: rms_norm_segment_pool(h, torch.ones(HIDDEN, device=DEVICE), 1e-6, *spans([0], [3]),
                                         residual=h.half()), "residual must match"),
    ],
)
def test_bad_inputs_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(rand((9, HIDDEN), torch.float32, seed=5))


@needs_cuda
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_gpu_bfloat16_long_spans(mode: str) -> None:
    lengths = [1, 4000, 37, 512, 2048, 3]
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    hidden = rand((bounds[-1], 4096), torch.bfloat16, seed=6)
    residual = rand((bounds[-1], 4096), torch.bfloat16, seed=7)
    weight = rand((4096,), torch.bfloat16, seed=8, scale=0.1, shift=1.0)
    # Skip a two-row "instruction" prefix wherever the sequence is long enough.
    starts, ends = spans([b + (2 if n > 2 else 0) for b, n in zip(bounds, lengths)], bounds[1:])
    got = segment_pool(hidden, starts, ends, mode, normalize=True, out=poisoned((6, 4096), torch.float32))
    assert_close(got, segment_pool_reference(hidden.double(), starts, ends, mode, True), floor=1e-5)
    got = rms_norm_segment_pool(hidden, weight, 1e-6, starts, ends, mode, True, residual=residual,
                                out=poisoned((6, 4096), torch.float32))
    ref64 = segment_pool_reference(
        rms_norm_reference(hidden.double(), weight.double(), 1e-6, 0.0, residual.double())[0], starts, ends, mode, True
    )
    torch_out = rms_norm_segment_pool_reference(hidden, weight, 1e-6, starts, ends, mode, True, 0.0, residual)
    assert_close(got, ref64, torch_out, floor=1e-5)
