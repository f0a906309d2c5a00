"""gated_activation (Triton) against gated_activation_reference for SiLU and tanh-GELU; odd token
counts, intermediate sizes that are not powers of two or span several column blocks."""
from __future__ import annotations

import pytest
import torch
from _compare import DEVICE, assert_close, needs_cuda, poisoned

from encoder_kernels.activations import ACTIVATIONS, gated_activation, gated_activation_reference

# The interpreter evaluates sigmoid as 1 / (1 + exp(-x)) in numpy, which warns when exp overflows
# for very negative x (the result, 0, is right).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def check(n_tokens: int, intermediate: int, dtype: torch.dtype, activation: str, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Wide range (std 4) to reach both tails; a row stride larger than 2I, as a column slice gives.
    buffer = (torch.randn(n_tokens, 2 * intermediate + 8, generator=gen) * 4).to(dtype=dtype, device=DEVICE)
    gate_up = buffer[:, : 2 * intermediate]
    out = poisoned((n_tokens, intermediate), dtype)
    got = gated_activation(gate_up, activation, out=out)
    assert got is out
    ref64 = gated_activation_reference(gate_up.double(), activation)
    assert_close(got, ref64, gated_activation_reference(gate_up, activation), name=f"{activation} ({dtype})")


@pytest.mark.parametrize("shape", [(23, 40), (1, 1), (7, 1500)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(dtype: torch.dtype, activation: str, shape: tuple[int, int]) -> None:
    check(*shape, dtype, activation, seed=shape[0])


def test_default_output_and_no_tokens() -> None:
    gate_up = torch.randn(5, 64, device=DEVICE)
    got = gated_activation(gate_up, "silu")
    assert got.shape == (5, 32) and got.dtype == gate_up.dtype
    assert_close(got, gated_activation_reference(gate_up.double(), "silu"))
    assert gated_activation(gate_up[:0], "gelu_tanh").shape == (0, 32)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: gated_activation(x, "relu"), "unknown activation"),
        (lambda x: gated_activation(x[:, :63], "silu"), r"\[tokens, 2 \* intermediate\]"),
        (lambda x: gated_activation(x.t().contiguous().t(), "silu"), "contiguous"),
        (lambda x: gated_activation(x.long(), "silu"), "supported: float32"),
        (lambda x: gated_activation(x, "silu", out=torch.empty(5, 32, dtype=torch.float16, device=DEVICE)), "out must"),
    ],
)
def test_bad_inputs_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(torch.randn(5, 64, device=DEVICE))


@needs_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_bfloat16_model_sizes(activation: str) -> None:
    check(4099, 14336, torch.bfloat16, activation, seed=1)
