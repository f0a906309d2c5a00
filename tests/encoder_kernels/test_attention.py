"""varlen_attention (Triton) against varlen_attention_reference on packed sequences: bidirectional and
causal, with and without logit soft-capping and sliding windows (both directions); the work list it
runs from; the reference itself against a dense float64 computation that shares none of its code.

q/k/v are strided views of one fused projection output, as the engine passes them; outputs are
NaN-poisoned before launch. A kernel output is judged by its error against the reference in float64
next to the reference's own error in the kernel's dtype (``assert_close``: at most 2x plus a floor).
Interpreter runs use float32/float16 and tiny shapes; bfloat16 and GPU-sized shapes run where CUDA is
(float32 is refused there: see the kernel). Numpy warnings are errors: an overflow or NaN anywhere in
the kernel's arithmetic, padded rows included, fails the test.
"""
from __future__ import annotations

import pytest
import torch
import triton
from _compare import DEVICE, assert_close, bf16_dot_needs_cuda, cu_seqlens_of, needs_cuda, poisoned

from engine.batch import pack
from encoder_kernels import attention
from encoder_kernels.attention import attention_plan, varlen_attention, varlen_attention_reference

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

ODD_LENGTHS = [1, 7, 33]
HEAD_DIMS = [64, 80, 96, 128, 256]
# One long sequence among many short ones: a max_seqlen grid would be mostly empty programs.
SKEWED = [70, 1, 3, 2, 1, 5, 1, 2]


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
    scale: float | None = None, seed: int = 0, max_seqlen: int | None = None, config: triton.Config | None = None,
    **flags,
) -> None:
    """Kernel vs the float64 reference, next to the reference in ``dtype``. ``flags``: causal,
    softcap, window. ``config`` pins one tile (the work list then holds that tile height)."""
    q, k, v = fused_qkv(sum(lengths), n_heads, n_kv, head_dim, dtype, seed)
    cu = cu_seqlens_of(lengths)
    out = poisoned(q.shape, dtype)
    if config is None:
        got = varlen_attention(q, k, v, cu, max_seqlen or max(lengths), scale, out=out, **flags)
    else:
        plan = attention_plan(lengths, n_heads // n_kv, DEVICE, tile_heights=[config.kwargs["BLOCK_M"]])
        got = attention._launch(q, k, v, out, plan, head_dim ** -0.5 if scale is None else scale,
                                flags.get("causal", False), flags.get("softcap"), flags.get("window"), config)
    assert got is out
    ref64 = varlen_attention_reference(q.double(), k.double(), v.double(), cu, scale=scale, **flags)
    torch_out = varlen_attention_reference(q, k, v, cu, scale=scale, **flags)
    assert_close(got, ref64, torch_out, name=f"attention lengths={lengths} H={n_heads} KV={n_kv} D={head_dim} {flags}")


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(dtype: torch.dtype, head_dim: int, group: int) -> None:
    """Every supported head dim (80 and 96 run in a 128-wide tile with a head-dim mask; 64, 128 and
    256 without one), without and with grouped-query packing (4 q heads per kv head in one tile)."""
    n_kv = 2 if group == 1 else 1
    check_against_reference(ODD_LENGTHS, n_kv * group, n_kv, head_dim, dtype, seed=head_dim + group)


# (flags, n_heads, n_kv, head_dim): each flag alone and together, a 3-way GQA group (not a power of
# two: tiles end inside a token's heads), an odd head dim. Softcap 2 saturates tanh on many scores.
FLAG_CASES = [
    (dict(causal=True), 4, 2, 64),
    (dict(softcap=2.0), 6, 2, 96),
    (dict(window=(3, 5)), 4, 2, 64),
    (dict(causal=True, window=(4, 0)), 6, 2, 64),
    (dict(causal=True, softcap=2.0, window=(9, 2)), 4, 1, 80),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("flags, n_heads, n_kv, head_dim", FLAG_CASES, ids=lambda x: str(x) if isinstance(x, dict) else None)
def test_causal_softcap_window_match_reference(flags: dict, n_heads: int, n_kv: int, head_dim: int,
                                               dtype: torch.dtype) -> None:
    check_against_reference(ODD_LENGTHS, n_heads, n_kv, head_dim, dtype, seed=head_dim + n_heads, **flags)


@pytest.mark.parametrize("flags", [{}, dict(causal=True, window=(16, 0)), dict(window=(5, 5), softcap=3.0)], ids=str)
def test_skewed_batch_one_long_many_short(flags: dict) -> None:
    check_against_reference(SKEWED, 4, 1, 64, torch.float16, seed=1, **flags)


# Tiles other than the interpreter's tuning one (32 x 16): square; a key block wider than the tile;
# a tile taller than the short sequences' packed rows whose diagonal crosses several key blocks.
@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (64, 16)])
def test_pinned_tiles_with_every_flag(block_m: int, block_n: int) -> None:
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)
    check_against_reference([40, 3, 17], 4, 2, 64, torch.float32, seed=block_m + block_n, config=config,
                            causal=True, softcap=4.0, window=(11, 0))
    check_against_reference([40, 3, 17], 4, 2, 64, torch.float32, seed=block_n, config=config, window=(6, 9))


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


def dense_attention_float64(q, k, v, lengths: list[int], scale: float, causal: bool = False,
                            softcap: float | None = None, window: tuple[int, int] | None = None) -> torch.Tensor:
    """Softmax over one [T, T] score matrix per head with a block-diagonal mask (and the causal /
    window conditions on in-sequence positions): a check of the reference that shares none of its
    code (no grouping, no SDPA, no sequence loop, its own mask)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.cat([torch.arange(n) for n in lengths])
    i, j = position[:, None], position[None, :]
    visible = segment[:, None] == segment[None, :]  # [T, T]
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= (i - j <= window[0]) & (j - i <= window[1])
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
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


@pytest.mark.parametrize("flags", [dict(causal=True), dict(softcap=1.5), dict(window=(2, 3)),
                                   dict(causal=True, window=(3, 0), softcap=2.0)], ids=str)
def test_reference_flags_equal_dense_masked_attention(flags: dict) -> None:
    lengths = [5, 3, 5, 1, 0, 8]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lengths), n, 16, generator=gen, dtype=torch.float64) for n in (4, 2, 2))
    got = varlen_attention_reference(q, k, v, cu_seqlens_of(lengths, device=torch.device("cpu")), scale=0.6, **flags)
    want = dense_attention_float64(q, k, v, [n for n in lengths if n], 0.6, **flags)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- the work list ----------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 3, 4])
def test_work_list_covers_every_packed_row_once_longest_first(group: int) -> None:
    """For every tile height: the items of each tile height tile each sequence's L * group packed rows
    exactly once, none is empty, and they run longest sequence first (heaviest tile first within one)."""
    lengths = [5, 0, 70, 1, 33, 33, 2]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    length_at = {start: n for start, n in zip(starts, lengths) if n}
    plan = attention_plan(lengths, group, "cpu", tile_heights=(16, 32, 64, 128))
    work = plan.work.tolist()
    assert plan.max_seqlen == 70 and plan.n_tokens == sum(lengths) and plan.group == group
    for bm, n_items in plan.n_items.items():
        first = work[bm // 16]
        items = [tuple(work[first + 3 * i : first + 3 * i + 3]) for i in range(n_items)]
        covered: dict[int, list[int]] = {}
        for start, length, row0 in items:
            assert 0 <= row0 < length * group, f"BLOCK_M={bm}: empty item {(start, length, row0)}"
            assert length_at.get(start) == length, f"BLOCK_M={bm}: item {(start, length, row0)} is no sequence"
            covered.setdefault(start, []).extend(range(row0, min(row0 + bm, length * group)))
        assert sorted(covered) == sorted(length_at), f"BLOCK_M={bm}: sequences without programs"
        for start, length in length_at.items():
            assert sorted(covered[start]) == list(range(length * group)), (bm, start, length)
        assert len(items) == sum(-(-n * group // bm) for n in lengths)  # no item beyond those tiles
        assert [-n for _, n, _ in items] == sorted(-n for _, n, _ in items), f"BLOCK_M={bm}: not longest first"
        for (start, _, row0), (next_start, _, next_row0) in zip(items, items[1:]):
            assert start != next_start or next_row0 < row0, f"BLOCK_M={bm}: not last tile first"


def test_work_list_sources_agree_and_packed_batch_caches_its_plan() -> None:
    """A plan passed in (the PackedBatch's, shared by every layer), host lengths, or lengths read from
    cu_seqlens: the same programs, so the same bits."""
    lengths = [9, 3, 14]
    q, k, v = fused_qkv(sum(lengths), 4, 2, 32, torch.float32, seed=9)
    cu = cu_seqlens_of(lengths)
    batch = pack([[1] * n for n in lengths], DEVICE)
    assert batch.attention_plan(2) is batch.attention_plan(2)
    assert batch.attention_plan(1) is not batch.attention_plan(2)
    outs = [varlen_attention(q, k, v, cu, 14, causal=True, plan=batch.attention_plan(2)),
            varlen_attention(q, k, v, cu, 14, causal=True, seqlens=lengths),
            varlen_attention(q, k, v, cu, 14, causal=True)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert_close(outs[0], varlen_attention_reference(q.double(), k.double(), v.double(), cu, causal=True))


@pytest.mark.parametrize("flags", [{}, dict(causal=True, window=(5, 0))])
def test_fixed_capacity_plan_refilled_in_place(flags: dict) -> None:
    """A CUDA graph's static batch: its work list has the capacity's shape whatever the batch, and
    rewritten in place (same tensor, same item counts) for another batch it gives that batch's
    attention; the no-op items store nothing (the poisoned rows of the empty slots stay poisoned)."""
    from engine.graphs import pack_padded, shape_for

    shape = shape_for(64, 40, max_sequences=8)
    capture = pack_padded([[0] * shape.max_seqlen], shape, DEVICE)  # what a capture runs
    plan = capture.attention_plan(2)
    work, n_items = plan.work, dict(plan.n_items)
    assert plan.max_seqlen == shape.max_seqlen and all(
        n == plan_items for n, plan_items in zip(n_items.values(), (capture.plan_capacity.items(2, bm) for bm in n_items)))
    for lengths in ([40, 3, 1], [9] * 7, [1]):  # refilled with the real lengths only: rows past them belong to no item
        capture.refill_attention_plans(lengths)
        assert capture.attention_plan(2).work is work and capture.attention_plan(2).n_items == n_items
        q, k, v = fused_qkv(shape.tokens, 4, 2, 32, torch.float32, seed=len(lengths))
        out = poisoned(q.shape, torch.float32)
        cu = cu_seqlens_of(lengths)
        got = varlen_attention(q, k, v, cu, shape.max_seqlen, out=out, plan=capture.attention_plan(2), **flags)
        used = sum(lengths)
        ref = varlen_attention_reference(q[:used].double(), k[:used].double(), v[:used].double(), cu, **flags)
        assert_close(got[:used], ref)  # a no-op item that stored would have overwritten token 0
        assert torch.isnan(got[used:]).all()
    with pytest.raises(ValueError, match="exceeds the plan capacity"):
        capture.refill_attention_plans([shape.max_seqlen + 1])


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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=-0.1), "scale must be a positive"),
        (dict(scale=float("nan")), "scale must be a positive"),
        (dict(softcap=0.0), "softcap must be a positive"),
        (dict(window=(-1, 2)), "window must be"),
        (dict(window=(3,)), "window must be"),
        (dict(window=(1.5, 2)), "window must be"),
        (dict(max_seqlen=4), "below the longest sequence"),
        (dict(seqlens=[4, 4]), "2 lengths for 1 sequences"),
        (dict(seqlens=[8], plan="own"), "not both"),
        (dict(plan=attention_plan([8], 1, DEVICE)), "built for 1 q heads per kv head"),
        (dict(plan=attention_plan([8, 3], 2, DEVICE)), "hold 11 tokens but q has 8"),
    ],
)
def test_bad_flags_and_plans_raise_value_error(kwargs: dict, message: str) -> None:
    q, k, v = _qkv()
    kwargs = dict(kwargs)
    if kwargs.get("plan") == "own":
        kwargs["plan"] = attention_plan([8], 2, DEVICE)
    max_seqlen = kwargs.pop("max_seqlen", 8)
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, v, cu_seqlens_of([8]), max_seqlen, **kwargs)


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


@bf16_dot_needs_cuda
@pytest.mark.parametrize("flags, n_heads, n_kv, head_dim", FLAG_CASES, ids=lambda x: str(x) if isinstance(x, dict) else None)
def test_bfloat16_flags_match_reference(flags: dict, n_heads: int, n_kv: int, head_dim: int) -> None:
    check_against_reference(ODD_LENGTHS, n_heads, n_kv, head_dim, torch.bfloat16, seed=head_dim, **flags)


GPU_FLAGS = [{}, dict(causal=True), dict(softcap=50.0, window=(511, 511)), dict(causal=True, window=(1023, 0))]


@needs_cuda
@pytest.mark.parametrize("flags", GPU_FLAGS, ids=str)
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_long_sequences(dtype: torch.dtype, head_dim: int, flags: dict) -> None:
    check_against_reference([1000, 2048, 17, 4096, 1], 8, 2, head_dim, dtype, seed=7, **flags)


@needs_cuda
def test_gpu_float32_is_refused_naming_the_reference_backend() -> None:
    q, k, v = fused_qkv(64, 4, 2, 128, torch.float32, seed=8)
    with pytest.raises(ValueError, match="backend='reference'"):
        varlen_attention(q, k, v, cu_seqlens_of([64]), 64)
