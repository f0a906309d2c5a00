"""Variable-length attention over packed sequences: bidirectional or causal, optional logit soft-cap
and sliding window.

``q``: [total_tokens, n_heads, head_dim]; ``k``, ``v``: [total_tokens, n_kv_heads, head_dim];
``cu_seqlens``: int32 [batch + 1] prefix sums of the sequence lengths. A token attends to tokens of
its own sequence only: all of them, those up to itself (causal), those in a window around it.

``varlen_attention_reference`` is the plain-PyTorch path; ``varlen_attention`` is a one-pass
FlashAttention-2 style Triton kernel (online softmax, no [L, L] matrix in memory). Its programs come
from a work list built once per batch on the host (``attention_plan``): one program per (query tile,
kv head), the q heads sharing a kv head packed into one tile, longest sequences first, none empty;
causal and windowed programs skip the key blocks they cannot see. Causal, soft-cap and window are
compile-time flags of one kernel. Tuning spaces per head dim and dtype are those that compile cleanly
for sm_90 (``encoder_kernels.sm90`` checks every one of them in the test suite).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from encoder_kernels._common import autotune_cache_kwargs, check_dtype, check_launchable, interpreting


def rows_by_length(seqlens: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The packed token rows of the sequences grouped by length: one int64 [seqs, length] tensor per
    distinct non-zero length, on ``device`` (the reference attention runs one call per group)."""
    starts_by_length: dict[int, list[int]] = {}
    start = 0
    for length in seqlens:
        if length:
            starts_by_length.setdefault(length, []).append(start)
        start += length
    return [
        (torch.tensor(starts)[:, None] + torch.arange(length)).to(device)
        for length, starts in starts_by_length.items()
    ]


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    groups: list[torch.Tensor] | None = None,
    *,
    causal: bool = False,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Plain-PyTorch attention over packed sequences (supports autograd and dropout).

    Sequences of equal length are gathered into one batched call, so nothing is padded: the result
    is what attending to each sequence on its own gives. ``groups``: ``rows_by_length`` of the batch,
    if the caller has it (the model computes it once per batch, not once per layer); otherwise it is
    derived from ``cu_seqlens``. ``causal``: query i sees keys j <= i of its sequence. ``softcap``:
    scores become ``softcap * tanh(score / softcap)`` before the softmax (Gemma-2). ``window``:
    ``(left, right)``, query i sees only keys in ``[i - left, i + right]``. Returns a tensor of q's
    shape and dtype. ``max_seqlen`` is accepted for signature parity with the kernel and unused.
    Dropout applies to the attention probabilities, as in training.
    """
    del max_seqlen
    total, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    scale = head_dim ** -0.5 if scale is None else scale
    if groups is None:
        groups = rows_by_length(cu_seqlens.diff().tolist(), q.device)
    if not groups:
        return q.new_empty(q.shape)
    outs = []
    for index in groups:  # [seqs, length]
        # [seqs, length, heads, head_dim] -> [seqs, heads, length, head_dim]
        qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))
        if softcap is None and window is None:
            o = F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout_p, scale=scale, is_causal=causal, enable_gqa=n_heads != n_kv
            )
        else:
            o = _explicit_attention(qs, ks, vs, scale, dropout_p, causal, softcap, window)
        outs.append(o.transpose(1, 2).reshape(-1, n_heads, head_dim))
    rows = torch.cat([index.flatten() for index in groups])
    return q.new_zeros(q.shape).index_copy(0, rows, torch.cat(outs))


def attention_mask(length: int, causal: bool, window: tuple[int, int] | None, device: torch.device | str) -> torch.Tensor | None:
    """bool [length, length], True where query i may see key j (None: every key visible)."""
    if not causal and window is None:
        return None
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    keep = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        left, right = window
        keep &= (j >= i - left) & (j <= i + right)
    return keep


def _explicit_attention(qs, ks, vs, scale, dropout_p, causal, softcap, window):
    """Scores materialised, for what SDPA cannot express (soft-capping, windows): [seqs, heads, L, D].
    Math in float32 (float64 for float64 inputs, so that it can serve as the float64 reference), the
    probabilities cast to the input dtype before the product with v, as transformers' eager
    attention does."""
    n_heads, n_kv, length = qs.shape[1], ks.shape[1], qs.shape[2]
    if n_heads != n_kv:
        ks = ks.repeat_interleave(n_heads // n_kv, dim=1)
        vs = vs.repeat_interleave(n_heads // n_kv, dim=1)
    math_dtype = torch.promote_types(qs.dtype, torch.float32)
    s = (qs.to(math_dtype) @ ks.to(math_dtype).transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    keep = attention_mask(length, causal, window, qs.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))  # the diagonal is always kept: no all-masked row
    p = torch.softmax(s, dim=-1)
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return (p.to(vs.dtype) @ vs)


# ---------------------------------------------------------------------------------------------------
# Tuning spaces
# ---------------------------------------------------------------------------------------------------

_MAX_HEAD_DIM = 256

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for float16 and bfloat16, from sm_90 compile reports of
# the candidate tiles (``python -m encoder_kernels.sm90`` prints them; ptxas 13.4, triton 3.9; float16 and
# bfloat16 compile to the same registers and shared memory). Kept: no register spill, shared memory
# within sm_90's 232,448 bytes, wgmma. Registers without flags / with causal + soft-cap + window:
# - head dim 64: 128x128 w8 s3 (197 / 254), 128x64 w8 s3 (124 / 194), 64x64 w4 s3 (130 / 167).
# - 128: 128x128 w8 s3 (252, 229,376 bytes of shared memory; causal 248), 128x64 w8 s3 (198 / 254),
#   64x64 w4 s3 (218 / 254). 128x128 spills with soft-cap or window (316 to 508 bytes), so those
#   launches leave it out. Spilling without flags: 128x64 w4 (460 bytes), 128x32 w4 (108), 64x128 w4
#   (48 at s3, 308 at s2), 128x128 w8 s2 (52).
# - 80 and 96 (BLOCK_D 128, masked): 128x64 w8 s3 (202 / 249), 64x64 w4 s3 (220 / 254); 128x128 is
#   left out (250 registers, and 37% / 25% of its columns masked).
# - 256: 128x32 w8 s3 (248; spills 28 to 128 bytes with any flag, so flagged launches leave it
#   out), 64x32 w8 s3 (190 / 254). Every 4-warp tile of 64 or 128 rows at BLOCK_N >= 32 spills (32 to
#   4,664 bytes), 64x64 w8 s2 spills 36, and 128x128, 128x64 and 64x128 at s3 exceed shared memory
#   (262,144 to 458,752 bytes).
# float32 has no tuning space on a GPU: as 3xTF32 on tensor cores every tile at head dim 128 spills
# (640 to 1,916 bytes, 64x16 to 128x32), and the IEEE FMA path spills at 32x32 already.
_TILES_64 = ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3))
_TILES_128 = ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3))
_TILES_128_SOFTCAP_OR_WINDOW = ((128, 64, 8, 3), (64, 64, 4, 3))
_TILES_128_MASKED = ((128, 64, 8, 3), (64, 64, 4, 3))  # head dims 80 and 96
_TILES_256 = ((128, 32, 8, 3), (64, 32, 8, 3))
_TILES_256_FLAGGED = ((64, 32, 8, 3),)


def _gpu_tiles(head_dim: int, causal: bool, softcap_or_window: bool) -> tuple[tuple[int, int, int, int], ...]:
    block_d = _block_d(head_dim)
    if block_d <= 64:
        return _TILES_64  # head dims below 64 take the 64 tiles, narrower
    if block_d == 128 and head_dim != 128:
        return _TILES_128_MASKED
    if block_d == 128:
        return _TILES_128_SOFTCAP_OR_WINDOW if softcap_or_window else _TILES_128
    return _TILES_256_FLAGGED if causal or softcap_or_window else _TILES_256


# The interpreter runs each program in numpy, at a cost per program and block rather than per
# element: one config, no tuning. 32 x 16: a tile spans several key blocks of a test's short
# sequences (the diagonal and window edges cross blocks) and costs half the programs of 16 x 16.
_INTERPRETER_TILE = (32, 16, 4, 1)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def gpu_tuning_space(head_dim: int, *, causal: bool = False, softcap: bool = False,
                     window: bool = False) -> list[triton.Config]:
    """The configs the autotuner may launch on a GPU (float16 and bfloat16) for ``head_dim`` and the
    kernel's flags, largest tile first."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _gpu_tiles(head_dim, causal, softcap or window)]


def _tuning_space(head_dim: int, causal: bool, softcap_or_window: bool) -> list[triton.Config]:
    if interpreting():
        bm, bn, w, s = _INTERPRETER_TILE
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
    return gpu_tuning_space(head_dim, causal=causal, softcap=softcap_or_window)


def _key(c: triton.Config) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _all_configs() -> list[triton.Config]:
    """Every config of every space, for the autotuner's list; fixed at import, as triton fixes
    interpreter mode when it is imported. Each launch's head dim prunes it to its own space."""
    seen: dict[tuple, triton.Config] = {}
    for head_dim in (64, 96, 128, 256):
        for causal, softcap_or_window in ((False, False), (True, False), (False, True)):
            for c in _tuning_space(head_dim, causal, softcap_or_window):
                seen.setdefault(_key(c), c)
    return list(seen.values())


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    space = {_key(c) for c in _tuning_space(kwargs["HEAD_DIM"], kwargs["CAUSAL"], kwargs["SOFTCAP"] or kwargs["WINDOW"])}
    return [c for c in configs if _key(c) in space]


TILE_HEIGHTS = tuple(sorted({c.kwargs["BLOCK_M"] for c in _all_configs()}))
"""Every BLOCK_M the autotuner may pick: a plan holds a work list for each."""


# ---------------------------------------------------------------------------------------------------
# Work list: the (sequence, query tile) pairs the kernel's programs run
# ---------------------------------------------------------------------------------------------------

_HEADER = 16  # int32 slots before the items: slot BLOCK_M // 16 holds where that tile height's items start


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """The programs of one packed batch, for every query-tile height the kernel may be tuned to.

    A sequence of length L with ``group`` query heads per kv head has ``L * group`` packed query rows
    per kv head: row p is token ``p // group`` of q head ``kv_head * group + p % group`` (grouped-query
    packing: the q heads that share a kv head sit in one tile and read each K/V block once). Each item
    is one tile of ``BLOCK_M`` packed rows: ``(first token of the sequence, L, first row)``, longest
    sequences first and, within a sequence, its last tile first (the heaviest one under causal
    attention), so the longest programs start first and no program is empty.

    ``work``: int32 [16 + 3 * items] on the batch's device: a header (slot ``BLOCK_M // 16`` is the
    offset of that tile height's items), then the items of each tile height in ``n_items``
    ({BLOCK_M: items}). ``max_seqlen``, ``n_tokens``: the longest sequence and the sum of the lengths.
    """

    work: torch.Tensor
    n_items: dict[int, int]
    group: int
    max_seqlen: int
    n_tokens: int


@dataclass(frozen=True)
class PlanCapacity:
    """A fixed work-list size, for launches whose grid must not depend on the batch (CUDA graphs):
    every batch of at most ``tokens`` tokens in at most ``sequences`` sequences of at most
    ``max_seqlen`` tokens gets a plan of the same shape. Per tile height ``BLOCK_M`` the list holds
    ``ceil(tokens * group / BLOCK_M) + sequences`` items (a bound on the tiles of any such batch: each
    sequence's tiles exceed its rows / BLOCK_M by less than one); the unused ones are no-op items
    ``(0, 1, group)``: one token, rows all past it, so the program reads token 0 and stores nothing."""

    tokens: int
    sequences: int
    max_seqlen: int

    def items(self, group: int, block_m: int) -> int:
        return -(-self.tokens * group // block_m) + self.sequences


def attention_plan(
    seqlens: Sequence[int], group: int, device: torch.device | str = "cpu",
    tile_heights: Sequence[int] | None = None, capacity: PlanCapacity | None = None,
) -> AttentionPlan:
    """Build the work list of a batch with host lengths ``seqlens`` (zero-length sequences allowed: they
    get no program) and ``group`` = n_heads // n_kv_heads, for ``tile_heights`` (default: every
    BLOCK_M of the tuning spaces); with ``capacity``, padded to that fixed shape (its ``max_seqlen``
    is then the plan's). One host-to-device copy."""
    tile_heights = TILE_HEIGHTS if tile_heights is None else tuple(tile_heights)
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    for bm in tile_heights:
        if bm % 16 or not 16 <= bm < 16 * _HEADER:
            raise ValueError(f"tile height {bm} must be a multiple of 16 below {16 * _HEADER}")
    lengths = torch.tensor(list(seqlens), dtype=torch.int64)
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"sequence lengths must be >= 0, got {int(lengths.min())}")
    n_tokens = int(lengths.sum())
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    if n_tokens >= 2**31 or max_seqlen * group >= 2**31:
        raise ValueError(f"{n_tokens} tokens (longest {max_seqlen} x {group} q heads per kv head) exceed the "
                         "kernel's int32 work list; split the batch")
    if capacity is not None:
        if n_tokens > capacity.tokens or len(seqlens) > capacity.sequences or max_seqlen > capacity.max_seqlen:
            raise ValueError(f"a batch of {len(seqlens)} sequences, {n_tokens} tokens, longest {max_seqlen}, "
                             f"exceeds the plan capacity {capacity}")
        max_seqlen = capacity.max_seqlen
    starts = lengths.cumsum(0) - lengths
    order = torch.argsort(lengths, descending=True, stable=True)
    order = order[lengths[order] > 0]
    rows = lengths[order] * group
    header = torch.zeros(_HEADER, dtype=torch.int64)
    sections, n_items, offset = [header], {}, _HEADER
    for bm in tile_heights:
        tiles = (rows + bm - 1) // bm  # [seqs], at least 1 each
        seq = order.repeat_interleave(tiles)
        ends = tiles.cumsum(0).repeat_interleave(tiles)  # one past each item's sequence's last item
        last_first = ends - 1 - torch.arange(int(tiles.sum()))  # tile index, counting down within a sequence
        items = torch.stack([starts[seq], lengths[seq], last_first * bm], dim=1)
        if capacity is not None:
            no_op = torch.tensor([0, 1, group]).expand(capacity.items(group, bm) - items.shape[0], 3)
            items = torch.cat([items, no_op])
        header[bm // 16] = offset
        n_items[bm] = items.shape[0]
        offset += items.numel()
        sections.append(items.flatten())
    work = torch.cat(sections).to(torch.int32)
    device = torch.device(device)
    if device.type == "cuda":
        work = work.pin_memory()  # a truly asynchronous copy: no wait for the stream here
    return AttentionPlan(work.to(device, non_blocking=True), n_items, group, max_seqlen, n_tokens)


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, K, V, n0, seqlen, tok, qk_scale, softcap_scale, window_left, window_right,
    stride_kt, stride_vt, offs_n, offs_d,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
    EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Fold keys/values ``[n0, n0 + BLOCK_N)`` of one sequence into the running softmax state.

    ``K``, ``V``: pointers to the sequence's first key of this kv head; ``tok``: int32 [BLOCK_M], the
    query token of each row. ``acc``: fp32 [BLOCK_M, BLOCK_D] unnormalised output; ``m_i``, ``l_i``:
    fp32 [BLOCK_M] running row max (log2 domain, scale applied) and row sum. MASKED blocks may hold
    keys past the sequence end or, under CAUSAL / WINDOW, keys some rows must not see.
    """
    cols = n0 + offs_n
    # The block's base offset in int64: n0 * (fused qkv token stride) overflows int32 in long sequences.
    n0_64 = tl.cast(n0, tl.int64)
    k_ptrs = K + n0_64 * stride_kt + offs_n[None, :] * stride_kt + offs_d[:, None]  # [BLOCK_D, BLOCK_N]
    v_ptrs = V + n0_64 * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    in_seq = cols < seqlen
    in_d = offs_d < HEAD_DIM
    if MASKED:
        if EVEN_D:
            k = tl.load(k_ptrs, mask=in_seq[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=in_d[:, None] & in_seq[None, :], other=0.0)
    else:
        if EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=in_d[:, None], other=0.0)
    s = tl.dot(q, k, input_precision="ieee")  # raw scores q.k; the precision only applies to float32
    if SOFTCAP:
        # cap * tanh(scale * s / cap) = 2 cap sigmoid(2 scale s / cap) - cap; the constant -cap is the
        # same for every key and cancels in the softmax. softcap_scale = 2 scale / cap, and qk_scale
        # = 2 cap log2(e) takes the result to the log2 domain. float32 throughout.
        s = tl.sigmoid(s * softcap_scale)
    if MASKED:
        if CAUSAL or WINDOW:
            # Key j is visible to query i when -left <= j - i <= right (causal: right = 0); under a
            # causal mask j <= i < seqlen, so the sequence end needs no test of its own.
            offset = cols[None, :] - tok[:, None]
            if CAUSAL:
                keep = offset <= 0
            else:
                keep = (offset <= window_right) & in_seq[None, :]
            if WINDOW:
                keep = keep & (offset >= -window_left)
        else:
            keep = in_seq[None, :]
        s = tl.where(keep, s, float("-inf"))
    # qk_scale > 0, so the row max can be taken before scaling; the scale then enters exp2 in one fma.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_sub = m_new
    if MASKED:
        if WINDOW:
            # A row may have seen no key yet (all left of its window): subtract 0, not -inf, so that
            # exp2(-inf - m) is 0 rather than NaN. Without a window every row sees key 0 first.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(tl.fma(s, qk_scale, -m_sub[:, None]))
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        if EVEN_D:
            v = tl.load(v_ptrs, mask=in_seq[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=in_seq[:, None] & in_d[None, :], other=0.0)
    else:
        if EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=in_d[None, :], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, m_new, l_i


@triton.autotune(configs=_all_configs(), key=["HEAD_DIM", "GROUP", "SEQ_BUCKET", "CAUSAL", "SOFTCAP", "WINDOW"],
                 prune_configs_by={"early_config_prune": _prune_configs}, **autotune_cache_kwargs())
@triton.jit(do_not_specialize=["window_left", "window_right", "SEQ_BUCKET"])
def _varlen_attention_kernel(
    Q, K, V, O, WORK, qk_scale, softcap_scale, window_left, window_right, n_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    SEQ_BUCKET,  # next power of two of the longest sequence: only an autotuning key
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: one work-list item (BLOCK_M packed rows of one sequence) for one kv head, against
    the keys of that sequence the tile can see. Program ids run item-major (all kv heads of item 0,
    then item 1...), so the work list's longest-first order is the launch order."""
    pid = tl.program_id(0)
    kv_head = pid % n_kv_heads
    item = WORK + tl.load(WORK + BLOCK_M // 16) + (pid // n_kv_heads) * 3
    start = tl.load(item).to(tl.int64)
    seqlen = tl.load(item + 1)
    row0 = tl.load(item + 2)

    rows = row0 + tl.arange(0, BLOCK_M)
    mask_m = rows < seqlen * GROUP
    # Rows past the end stand in for the last token (valid addresses, a finite softmax); never stored.
    tok = tl.minimum(rows // GROUP, seqlen - 1)
    head = kv_head * GROUP + rows % GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < HEAD_DIM

    q_rows = start * stride_qt + tok.to(tl.int64) * stride_qt + head * stride_qh
    if EVEN_D:
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :])
    else:
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=in_d[None, :], other=0.0)
    k_seq = K + start * stride_kt + kv_head * stride_kh
    v_seq = V + start * stride_vt + kv_head * stride_vh

    # Keys the tile needs, [lo, hi), and those every row of it sees, [full_lo, full_hi).
    tok_lo = row0 // GROUP
    tok_hi = tl.minimum((row0 + BLOCK_M - 1) // GROUP, seqlen - 1)
    lo = 0
    hi = seqlen
    full_lo = 0
    full_hi = seqlen
    if CAUSAL:
        hi = tl.minimum(hi, tok_hi + 1)
        full_hi = tl.minimum(full_hi, tok_lo + 1)
    if WINDOW:
        lo = tl.maximum(tok_lo - window_left, 0)
        hi = tl.minimum(hi, tok_hi + window_right + 1)
        full_lo = tl.maximum(tok_hi - window_left, 0)
        full_hi = tl.minimum(full_hi, tok_lo + window_right + 1)
    # In key-block starts: [lo_b, full_lo_b) masked, [full_lo_b, full_hi_b) unmasked, [full_hi_b, hi_b)
    # masked. Blocks outside [lo_b, hi_b) are skipped: causal programs stop at their diagonal.
    lo_b = (lo // BLOCK_N) * BLOCK_N
    hi_b = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    full_lo_b = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo_b), hi_b)
    full_hi_b = tl.maximum(tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi_b), full_lo_b)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WINDOW:
        for n0 in range(lo_b, full_lo_b, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, k_seq, v_seq, n0, seqlen, tok, qk_scale, softcap_scale, window_left,
                window_right, stride_kt, stride_vt, offs_n, offs_d,
                True, CAUSAL, SOFTCAP, WINDOW, EVEN_D, HEAD_DIM)
    for n0 in range(full_lo_b, full_hi_b, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_seq, v_seq, n0, seqlen, tok, qk_scale, softcap_scale, window_left,
            window_right, stride_kt, stride_vt, offs_n, offs_d,
            False, CAUSAL, SOFTCAP, WINDOW, EVEN_D, HEAD_DIM)
    if CAUSAL or WINDOW:
        for n0 in range(full_hi_b, hi_b, BLOCK_N):  # the diagonal (causal) or the window's right edge
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, k_seq, v_seq, n0, seqlen, tok, qk_scale, softcap_scale, window_left,
                window_right, stride_kt, stride_vt, offs_n, offs_d,
                True, CAUSAL, SOFTCAP, WINDOW, EVEN_D, HEAD_DIM)
    elif full_hi_b < hi_b:  # at most one block: the sequence's ragged end
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_seq, v_seq, full_hi_b, seqlen, tok, qk_scale, softcap_scale, window_left,
            window_right, stride_kt, stride_vt, offs_n, offs_d,
            True, CAUSAL, SOFTCAP, WINDOW, EVEN_D, HEAD_DIM)

    # Every row saw its own token's key, so l_i > 0.
    acc = acc * (1.0 / l_i)[:, None]
    o_ptrs = O + (start * stride_ot + tok.to(tl.int64) * stride_ot + head * stride_oh)[:, None] + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & in_d[None, :])


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    out: torch.Tensor | None,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        check_dtype(name, t)
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has {q.shape[0]} tokens but k/v have {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} differs from k/v head_dim {k.shape[2]}")
    n_heads, n_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} unsupported; the kernel handles 1..{_MAX_HEAD_DIM}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [batch + 1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    devices = {t.device for t in (q, k, v, cu_seqlens)} | ({out.device} if out is not None else set())
    if len(devices) != 1:
        raise ValueError(f"q, k, v, cu_seqlens{', out' if out is not None else ''} are on different devices: "
                         f"{sorted(map(str, devices))}")
    check_launchable(q.device)
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
        if out.numel() and out.stride(-1) != 1:
            raise ValueError("out must be contiguous in its last (head_dim) dimension")


def _check_flags(scale: float, softcap: float | None, window: tuple[int, int] | None) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in window)):
            raise ValueError(f"window must be (left, right) with ints >= 0, got {window!r}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    causal: bool = False,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    plan: AttentionPlan | None = None,
    seqlens: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence; returns a tensor of q's shape and dtype.

    ``q``: [T, H, D]; ``k``, ``v``: [T, KV, D] with ``H % KV == 0`` (grouped-query: query head h reads
    kv head ``h // (H // KV)``); D in 1..256; float16 or bfloat16 (softmax and accumulation in
    float32), and float32 under the CPU interpreter only: on a GPU float32 raises ValueError naming
    the reference backend (every float32 tile spills registers on sm_90). Only the last dimension
    must be contiguous: q/k/v may be views of a fused qkv projection, whose token stride is
    (H + 2 * KV) * D. ``cu_seqlens``: int32 [batch + 1] on the same device. ``scale`` (> 0) defaults
    to ``D ** -0.5``. ``causal``: query i sees keys j <= i of its sequence. ``softcap``: scores become
    ``softcap * tanh(score / softcap)`` before the softmax. ``window``: ``(left, right)``, query i sees
    only keys in ``[i - left, i + right]``. ``out``: optional [T, H, D] buffer of q's dtype (last dim
    contiguous) to write into; it is returned. Rows past ``cu_seqlens[-1]`` are not written.

    The programs come from a work list built on the host from the sequence lengths: ``plan`` (from
    :func:`attention_plan`; a :class:`~engine.batch.PackedBatch` builds one per batch and every layer
    shares it), or else one built here from ``seqlens`` (host lengths, which must match
    ``cu_seqlens``) or, if neither is given, from ``cu_seqlens`` at the cost of one device-to-host
    copy. ``max_seqlen`` must be at least the longest sequence (checked against the host lengths).
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, out)
    if q.dtype == torch.float32 and q.device.type == "cuda":
        raise ValueError("float32 attention does not run on the Triton kernel on a GPU (every float32 tile spills "
                         "registers on sm_90, as 3xTF32 or IEEE products); use backend='reference' for float32, "
                         "or float16/bfloat16 with backend='triton'")
    total, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    _check_flags(scale, softcap, window)
    if plan is None:
        if seqlens is None:
            seqlens = cu_seqlens.diff().tolist()  # the one device-to-host copy a plan saves
        elif len(seqlens) != cu_seqlens.numel() - 1:
            raise ValueError(f"seqlens has {len(seqlens)} lengths for {cu_seqlens.numel() - 1} sequences")
        plan = attention_plan(seqlens, group, q.device)
    elif seqlens is not None:
        raise ValueError("pass plan or seqlens, not both")
    elif plan.group != group or plan.work.device != q.device:
        raise ValueError(f"plan was built for {plan.group} q heads per kv head on {plan.work.device}; "
                         f"q/k give {group} on {q.device}")
    if plan.max_seqlen > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence ({plan.max_seqlen})")
    if plan.n_tokens > total:
        raise ValueError(f"the sequences hold {plan.n_tokens} tokens but q has {total}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if plan.n_tokens == 0:
        return out
    return _launch(q, k, v, out, plan, scale, causal, softcap, window)


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: AttentionPlan, scale: float,
    causal: bool, softcap: float | None, window: tuple[int, int] | None, config: triton.Config | None = None,
) -> torch.Tensor:
    """Launch on checked inputs; ``config`` pins one tile instead of autotuning (tests use it to run
    tile shapes the interpreter's single tuning config does not cover)."""
    head_dim, n_kv = q.shape[2], k.shape[1]
    if window is not None:
        # Clamped to the batch (ints stay small); a window that covers every sequence is no window.
        left, right = (min(w, plan.max_seqlen) for w in window)
        if left >= plan.max_seqlen - 1 and (causal or right >= plan.max_seqlen - 1):
            window = None
    left, right = (left, right) if window is not None else (0, 0)
    log2e = math.log2(math.e)  # the softmax runs in exp2, cheaper than exp
    if softcap is None:
        qk_scale, softcap_scale = scale * log2e, 0.0
    else:
        qk_scale, softcap_scale = 2.0 * softcap * log2e, 2.0 * scale / softcap
    block_d = _block_d(head_dim)
    args = (
        q, k, v, out, plan.work, qk_scale, softcap_scale, left, right, n_kv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        max(64, triton.next_power_of_2(plan.max_seqlen)),  # >= 64: one integer specialisation
    )
    flags = dict(
        GROUP=q.shape[1] // n_kv, HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
        CAUSAL=bool(causal), SOFTCAP=softcap is not None, WINDOW=window is not None,
    )

    def grid(meta: dict) -> tuple[int]:
        return (plan.n_items[meta["BLOCK_M"]] * n_kv,)

    if config is None:
        _varlen_attention_kernel[grid](*args, **flags)
    else:
        _varlen_attention_kernel.fn[grid](*args, **flags, **config.all_kwargs())
    return out
