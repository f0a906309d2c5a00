"""varlen_attention (Triton) against varlen_attention_reference on packed, non-causal sequences.

q/k/v are strided views of one fused projection output, as the engine passes them; outputs are
NaN-poisoned before launch. Interpreter runs use float32/float16 and tiny shapes; bfloat16 and
GPU-sized shapes run where CUDA is present.
"""
from __future__ import annotations

import pytest
import torch
from _compare import DEVICE, assert_close, bf16_dot_needs_cuda, cu_seqlens_of, needs_cuda, poisoned

from kernels.attention import varlen_attention, varlen_attention_reference

ODD_LENGTHS = [1, 7, 33]


def fused_qkv(n_tokens: int, n_heads: int, n_kv: int, head_dim: int, dtype: torch.dtype, seed: int):
    """q [T, H, D], k and v [T, KV, D]: views of one [T, (H + 2 KV) D] buffer (token stride > H D)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n_tokens, (n_heads + 2 * n_kv) * head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    q_size, kv_size = n_heads * head_dim, n_kv * head_dim
    q = qkv[:, :q_size].view(n_tokens, n_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(n_tokens, n_kv, head_dim)
    v = qkv[:, q_size + kv_size :].view(n_tokens, n_kv, head_dim)
    return q, k, v


def check_against_reference(
    lengths: list[int], n_heads: int, n_kv: int, head_dim: int, dtype: torch.dtype,
    scale: float | None = None, seed: int = 0, max_seqlen: int | None = None,
) -> None:
    q, k, v = fused_qkv(sum(lengths), n_heads, n_kv, head_dim, dtype, seed)
    cu = cu_seqlens_of(lengths)
    out = poisoned(q.shape, dtype)
    got = varlen_attention(q, k, v, cu, max_seqlen or max(lengths), scale, out=out)
    assert got is out
    ref64 = varlen_attention_reference(q.double(), k.double(), v.double(), cu, scale=scale)
    torch_out = varlen_attention_reference(q, k, v, cu, scale=scale)
    assert_close(got, ref64, torch_out, name=f"attention lengths={lengths} H={n_heads} KV={n_kv} D={head_dim}")


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(dtype: torch.dtype, head_dim: int, group: int) -> None:
    n_kv = 2 if group < 4 else 1
    check_against_reference(ODD_LENGTHS, n_kv * group, n_kv, head_dim, dtype, seed=head_dim + group)


def test_one_sequence_much_longer_than_the_rest() -> None:
    check_against_reference([2, 5, 75, 1, 3], 4, 2, 96, torch.float16, seed=1)


def test_custom_scale_and_max_seqlen_above_longest() -> None:
    check_against_reference([9, 20], 2, 1, 64, torch.float32, scale=0.3, seed=2, max_seqlen=64)


def test_contiguous_inputs_default_output() -> None:
    q, k, v = (t.contiguous() for t in fused_qkv(17, 2, 1, 64, torch.float16, seed=3))
    cu = cu_seqlens_of([10, 7])
    got = varlen_attention(q, k, v, cu, 10)
    assert got.shape == q.shape and got.dtype == q.dtype
    ref64 = varlen_attention_reference(q.double(), k.double(), v.double(), cu)
    assert_close(got, ref64, varlen_attention_reference(q, k, v, cu))


def test_strided_output_view_writes_only_its_elements() -> None:
    """``out`` may itself be a strided view; nothing outside it is written."""
    q, k, v = fused_qkv(21, 2, 1, 64, torch.float32, seed=4)
    buffer = poisoned((21, 4 * 64), torch.float32)
    out = buffer[:, 64 : 3 * 64].view(21, 2, 64)
    cu = cu_seqlens_of([14, 7])
    varlen_attention(q, k, v, cu, 14, out=out)
    assert_close(out, varlen_attention_reference(q.double(), k.double(), v.double(), cu))
    assert buffer[:, :64].isnan().all() and buffer[:, 3 * 64 :].isnan().all()


def test_zero_length_sequences_and_empty_batch() -> None:
    q, k, v = fused_qkv(8, 2, 2, 64, torch.float32, seed=5)
    cu = cu_seqlens_of([3, 0, 5])
    got = varlen_attention(q, k, v, cu, 5, out=poisoned(q.shape, torch.float32))
    ref = torch.cat([varlen_attention_reference(q[:3], k[:3], v[:3], cu_seqlens_of([3])),
                     varlen_attention_reference(q[3:], k[3:], v[3:], cu_seqlens_of([5]))])
    assert_close(got, ref.double())
    empty = varlen_attention(q[:0], k[:0], v[:0], cu_seqlens_of([]), 0)
    assert empty.shape == (0, 2, 64)


def dense_attention_float64(q, k, v, lengths: list[int], scale: float) -> torch.Tensor:
    """Softmax over one [T, T] score matrix per head with a block-diagonal mask: a check of the
    reference that shares none of its code (no grouping, no SDPA, no sequence loop)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    same = segment[:, None] == segment[None, :]  # [T, T]
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    probs = scores.masked_fill(~same, float("-inf")).softmax(dim=-1)
    return torch.einsum("hts,shd->thd", probs, v)


@pytest.mark.parametrize("group", [1, 4])
def test_reference_equals_dense_masked_attention_with_gradients(group: int) -> None:
    """Equal-length sequences share one batched call in the reference; values and gradients must be
    those of attending to each sequence alone."""
    lengths = [5, 3, 5, 1, 0, 3, 5, 8]
    n_kv = 2
    gen = torch.Generator().manual_seed(group)
    q, k, v = (torch.randn(sum(lengths), n, 16, generator=gen, dtype=torch.float64, requires_grad=True)
               for n in (n_kv * group, n_kv, n_kv))
    cu = cu_seqlens_of(lengths, device=torch.device("cpu"))
    got = varlen_attention_reference(q, k, v, cu, scale=0.37)
    want = dense_attention_float64(q, k, v, [n for n in lengths if n], 0.37)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")


def _qkv(t=8, h=4, kv=2, d=64, dtype=torch.float32):
    return [torch.randn(t, n, d, dtype=dtype, device=DEVICE) for n in (h, kv, kv)]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (*_qkv(h=3, kv=2), cu_seqlens_of([8]), 8), "not a multiple of n_kv_heads"),
        (lambda: (*_qkv()[:2], _qkv(kv=1)[2], cu_seqlens_of([8]), 8), "same shape"),
        (lambda: (_qkv(t=9)[0], *_qkv()[1:], cu_seqlens_of([8]), 8), "tokens"),
        (lambda: (_qkv(d=32)[0], *_qkv()[1:], cu_seqlens_of([8]), 8), "head_dim"),
        (lambda: (*_qkv(d=512), cu_seqlens_of([8]), 8), "unsupported"),
        (lambda: (_qkv(dtype=torch.float16)[0], *_qkv()[1:], cu_seqlens_of([8]), 8), "dtypes differ"),
        (lambda: (*_qkv(dtype=torch.float64), cu_seqlens_of([8]), 8), "supported: float32"),
        (lambda: (*_qkv(), cu_seqlens_of([8]).long(), 8), "int32"),
        (lambda: (*_qkv(), cu_seqlens_of([8]), -1), "max_seqlen"),
        (lambda: (_qkv()[0][0], *_qkv()[1:], cu_seqlens_of([8]), 8), r"\[tokens, heads, head_dim\]"),
        (lambda: (torch.randn(8, 64, 4, device=DEVICE).transpose(1, 2), *_qkv()[1:], cu_seqlens_of([8]), 8),
         "contiguous"),
        (lambda: (*_qkv(), cu_seqlens_of([8], device=torch.device("meta")), 8), "different devices"),
    ],
)
def test_bad_inputs_raise_value_error(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        varlen_attention(*make())


def test_cpu_tensors_without_interpreter_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (t.cpu() for t in _qkv())
    with pytest.raises(ValueError, match="need a GPU"):
        varlen_attention(q, k, v, cu_seqlens_of([8], device=torch.device("cpu")), 8)


@bf16_dot_needs_cuda
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_bfloat16_matches_reference(head_dim: int, group: int) -> None:
    check_against_reference(ODD_LENGTHS, 2 * group, 2, head_dim, torch.bfloat16, seed=head_dim * group)


@needs_cuda
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_long_sequences(dtype: torch.dtype, head_dim: int) -> None:
    check_against_reference([1000, 2048, 17, 4096, 1], 8, 2, head_dim, dtype, seed=7)


@needs_cuda
def test_gpu_float32_uses_full_precision_products() -> None:
    # tf32 products would cost ~1e-3; the kernel asks for IEEE float32 dots on float32 inputs.
    check_against_reference([300, 513], 4, 4, 128, torch.float32, seed=8)
