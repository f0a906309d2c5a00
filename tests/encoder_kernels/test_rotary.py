"""rotary_ and qk_norm_rotary_ (one Triton kernel, in place) against their references on packed
tokens: q and k are strided views of one fused qkv buffer, positions restart at every sequence,
Llama-3.1 scaled frequencies; the q/k norm (Qwen3) against float64 math."""
from __future__ import annotations

import pytest
import torch
from _compare import DEVICE, assert_close, needs_cuda

from encoder_kernels.rotary import (qk_norm_rotary_, qk_norm_rotary_reference, rotary_, rotary_cos_sin, rotary_inv_freq,
                            rotary_reference)

LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)


def rotate64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotate_half rotation in float64 throughout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float64: x / rms(x) * w."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def check(lengths: list[int], n_heads: int, n_kv: int, head_dim: int, dtype: torch.dtype,
          scaling: dict | None = None, seed: int = 0, qk_norm: bool = False) -> None:
    n_tokens = sum(lengths)
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n_tokens, (n_heads + 2 * n_kv) * head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    q_size, kv_size = n_heads * head_dim, n_kv * head_dim
    q = qkv[:, :q_size].view(n_tokens, n_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(n_tokens, n_kv, head_dim)
    v_before = qkv[:, q_size + kv_size :].clone()
    # Far positions make the large angles (and so the cos/sin rounding) matter.
    positions = packed_positions(lengths) * 997
    cos, sin = rotary_cos_sin(positions, rotary_inv_freq(head_dim, 500000.0, scaling))
    q_in, k_in = q.clone(), k.clone()
    if qk_norm:
        eps = 1e-6
        # Weights away from 1 (and one half's scale differing from the other's) so a mixed-up half shows.
        q_w = (1 + 0.5 * torch.randn(head_dim, generator=gen)).to(device=DEVICE)
        k_w = (1 + 0.5 * torch.randn(head_dim, generator=gen)).to(device=DEVICE)
        torch_q, torch_k = qk_norm_rotary_reference(q_in, k_in, q_w, k_w, eps, cos, sin)
        q64 = rotate64(norm64(q_in, q_w, eps), cos, sin)
        k64 = rotate64(norm64(k_in, k_w, eps), cos, sin)
        got_q, got_k = qk_norm_rotary_(q, k, q_w, k_w, eps, cos, sin)
    else:
        torch_q, torch_k = rotary_reference(q_in, k_in, cos, sin)
        q64, k64 = rotate64(q_in, cos, sin), rotate64(k_in, cos, sin)
        got_q, got_k = rotary_(q, k, cos, sin)
    assert got_q is q and got_k is k, "the kernel works in place and returns its arguments"
    what = "qk_norm_rotary" if qk_norm else "rotary"
    assert_close(q, q64, torch_q, name=f"{what} q ({dtype}, D={head_dim})")
    assert_close(k, k64, torch_k, name=f"{what} k ({dtype}, D={head_dim})")
    assert torch.equal(qkv[:, q_size + kv_size :], v_before), "v (beside q and k in the buffer) was written"


@pytest.mark.parametrize("n_heads, n_kv", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(dtype: torch.dtype, head_dim: int, n_heads: int, n_kv: int) -> None:
    check([1, 7, 33], n_heads, n_kv, head_dim, dtype,
          scaling=LLAMA3_SCALING if head_dim == 128 else None, seed=head_dim + n_heads + n_kv)


def test_one_sequence_much_longer_than_the_rest() -> None:
    check([2, 70, 1, 3], 3, 1, 64, torch.float16, seed=1)


@pytest.mark.parametrize("head_dim, n_heads, n_kv", [(96, 3, 1), (128, 4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_qk_norm_matches_float64(dtype: torch.dtype, head_dim: int, n_heads: int, n_kv: int) -> None:
    """Qwen3's per-head RMSNorm then rotary, fused (head_dim 96 runs in a padded 64-lane half tile)."""
    check([1, 7, 33], n_heads, n_kv, head_dim, dtype, seed=head_dim + n_heads, qk_norm=True)


def test_qk_norm_weights_are_checked() -> None:
    q, k, cos, sin = _args()
    with pytest.raises(ValueError, match=r"q_weight must be a float tensor \[64\]"):
        qk_norm_rotary_(q, k, torch.ones(32, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6, cos, sin)
    with pytest.raises(ValueError, match="k_weight"):
        qk_norm_rotary_(q, k, torch.ones(64, device=DEVICE), torch.ones(64, dtype=torch.int32, device=DEVICE), 1e-6,
                        cos, sin)
    with pytest.raises(ValueError, match="eps"):
        qk_norm_rotary_(q, k, torch.ones(64, device=DEVICE), torch.ones(64, device=DEVICE), 0.0, cos, sin)


def test_no_tokens() -> None:
    q, k = torch.empty(0, 2, 64, device=DEVICE), torch.empty(0, 1, 64, device=DEVICE)
    cos = sin = torch.empty(0, 32, device=DEVICE)
    assert rotary_(q, k, cos, sin) == (q, k)


def _args(t=5, h=2, kv=1, d=64, dtype=torch.float32):
    return [torch.randn(t, h, d, dtype=dtype, device=DEVICE), torch.randn(t, kv, d, dtype=dtype, device=DEVICE),
            torch.randn(t, d // 2, device=DEVICE), torch.randn(t, d // 2, device=DEVICE)]


def _replace(args, i, value):
    args[i] = value
    return args


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _args(d=63), "must be even"),
        (lambda: _replace(_args(), 2, torch.randn(5, 31, device=DEVICE)), "cos must be"),
        (lambda: _replace(_args(), 3, torch.randn(5, 32, device=DEVICE).half()), "sin must be"),
        (lambda: _replace(_args(), 1, torch.randn(5, 1, 64, device=DEVICE).half()), "dtypes differ"),
        (lambda: _replace(_args(), 1, torch.randn(6, 1, 64, device=DEVICE)), "disagree"),
        (lambda: _replace(_args(), 0, torch.randn(5, 64, 2, device=DEVICE).transpose(1, 2)), "contiguous"),
        (lambda: _replace(_args(), 0, torch.randn(5, 128, device=DEVICE)), r"\[tokens, heads, head_dim\]"),
    ],
)
def test_bad_inputs_raise_value_error(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rotary_(*make())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_sizes(dtype: torch.dtype) -> None:
    check([4096, 1, 2000, 37, 1024], 32, 8, 128, dtype, scaling=LLAMA3_SCALING, seed=2)
    check([4096, 1, 2000, 37, 1024], 16, 8, 128, dtype, seed=3, qk_norm=True)  # Qwen3-Embedding-0.6B
