"""CUDA graphs for small batches: a batch runs padded to a fixed bucket shape, one graph per shape.

A small batch is bound by kernel launches, not by the GPU: a 7B forward is some 400 launches (about a
dozen per layer), milliseconds of host time, as long as the GPU needs for a 32-token query. A CUDA
graph replays all of them with one launch, but only with the shapes and addresses it was captured
with. So a batch of ``T`` tokens whose longest sequence has ``S`` tokens runs as the
:class:`BucketShape` ``(tokens, max_seqlen, slots)``:

- ``tokens``: the smallest of :data:`TOKEN_BUCKETS` (powers of two, 16 to 2048) holding ``T``;
- ``max_seqlen``: the next power of two of ``S``, at least 64 (the attention kernel's smallest
  tuning key) and at most ``tokens``: the attention grid covers it, so it is fixed per graph;
- ``slots``: a fixed number of sequences, ``min(MAX_SEQUENCES, tokens) + ceil(tokens / max_seqlen)``.

The real sequences come first, in order; the ``tokens - T`` extra tokens form dummy sequences of at
most ``max_seqlen`` tokens (token id 0, positions from 0); empty sequences fill the remaining slots
(they get no attention program). No row ever mixes with
another sequence's rows (attention stays within a sequence, every other op is per token), so the
real rows come out as in the unpadded batch: the same values up to the rounding of matrix products
of another row count. Batches with more tokens than the largest bucket or more sequences than
:data:`MAX_SEQUENCES` run eagerly, as do all batches where graphs are off.

:class:`BucketedForward` is the whole mechanism: with ``graphs=True`` (CUDA) it captures one graph
per shape (at :meth:`capture_all`, which ``Engine.warmup`` calls, or at a shape's first use) and
replays it after copying the batch into the graph's static inputs; with ``graphs=False`` it runs the
same padded batch eagerly, which is how the padding is tested on a CPU.

What capture needs from the backend: no host synchronisation and no host-to-device copy inside the
forward (everything per batch is in the :class:`~engine.batch.PackedBatch` tensors, which are copied
into the static ones before each replay), and launch grids that depend only on the bucket shape: the
attention's work list is built to the bucket's :class:`~encoder_kernels.attention.PlanCapacity` (a fixed
item count per tile height, unused items are no-ops) and rewritten in place before each replay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from encoder_kernels.attention import PlanCapacity

from .batch import PackedBatch

TOKEN_BUCKETS: tuple[int, ...] = tuple(1 << p for p in range(4, 12))  # 16, 32, ..., 2048 tokens
MAX_SEQUENCES = 64  # encode's default batch size
MIN_SEQ_BUCKET = 64
PAD_TOKEN_ID = 0


@dataclass(frozen=True, order=True)
class BucketShape:
    """The static shape a batch is padded to: ``tokens`` rows, sequences of at most ``max_seqlen``
    tokens, ``slots`` sequences (dummy and empty ones included)."""

    tokens: int
    max_seqlen: int
    slots: int


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def bucket_shape(
    seqlens: Sequence[int], token_buckets: Sequence[int] = TOKEN_BUCKETS, max_sequences: int = MAX_SEQUENCES,
) -> BucketShape | None:
    """The bucket of a batch with these sequence lengths, or None when none holds it (too many tokens
    or sequences, or an empty batch)."""
    if not seqlens or len(seqlens) > max_sequences or min(seqlens) < 1:
        return None
    total = sum(seqlens)
    tokens = next((b for b in sorted(token_buckets) if b >= total), None)
    if tokens is None:
        return None
    return shape_for(tokens, max(seqlens), max_sequences)


def shape_for(tokens: int, longest: int, max_sequences: int = MAX_SEQUENCES) -> BucketShape:
    """The shape of bucket ``tokens`` for batches whose longest sequence has ``longest`` tokens."""
    max_seqlen = min(tokens, max(MIN_SEQ_BUCKET, _next_power_of_two(longest)))
    return BucketShape(tokens, max_seqlen, min(max_sequences, tokens) + -(-tokens // max_seqlen))


def padded_lengths(seqlens: Sequence[int], shape: BucketShape) -> list[int]:
    """``seqlens``, then dummy sequences of at most ``shape.max_seqlen`` tokens up to ``shape.tokens``,
    then empty sequences up to ``shape.slots``."""
    pad = shape.tokens - sum(seqlens)
    if pad < 0 or max(seqlens, default=0) > shape.max_seqlen:
        raise ValueError(f"sequences of lengths {list(seqlens)} do not fit the bucket {shape}")
    dummies = [shape.max_seqlen] * (pad // shape.max_seqlen) + ([pad % shape.max_seqlen] if pad % shape.max_seqlen else [])
    lengths = [*seqlens, *dummies]
    if len(lengths) > shape.slots:
        raise ValueError(f"{len(seqlens)} sequences and {len(dummies)} dummies exceed the {shape.slots} slots of {shape}")
    return lengths + [0] * (shape.slots - len(lengths))


def padded_host_tensors(
    sequences: Sequence[Sequence[int]], shape: BucketShape,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """On the host: int64 token ids and positions [shape.tokens], int32 cu_seqlens [shape.slots + 1]
    and the lengths of ``sequences`` padded to ``shape`` (see the module docstring)."""
    lengths = padded_lengths([len(s) for s in sequences], shape)
    ids = torch.full((shape.tokens,), PAD_TOKEN_ID, dtype=torch.int64)
    n_real = sum(len(s) for s in sequences)
    if n_real:
        ids[:n_real] = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
    counts = torch.tensor(lengths, dtype=torch.int64)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(counts, 0, out=cu[1:])
    positions = torch.arange(shape.tokens, dtype=torch.int64) - torch.repeat_interleave(cu[:-1].long(), counts)
    return ids, positions, cu, tuple(lengths)


def pack_padded(sequences: Sequence[Sequence[int]], shape: BucketShape, device: torch.device | str = "cpu") -> PackedBatch:
    """The packed batch of ``sequences`` padded to ``shape``, on ``device``. Its first
    ``sum(len(s))`` rows are the real tokens, in order."""
    ids, positions, cu, lengths = padded_host_tensors(sequences, shape)
    capacity = PlanCapacity(shape.tokens, shape.slots, shape.max_seqlen)
    device = torch.device(device)
    if device.type == "cuda":
        # From pinned memory the copies are asynchronous: the host goes on while the batch uploads.
        ids, positions, cu = (t.pin_memory().to(device, non_blocking=True) for t in (ids, positions, cu))
    else:
        ids, positions, cu = (t.to(device) for t in (ids, positions, cu))
    return PackedBatch(input_ids=ids, positions=positions, cu_seqlens=cu, seqlens=lengths, plan_capacity=capacity)


def _capture_sequences(shape: BucketShape) -> list[list[int]]:
    """A batch of the exact shape: its longest sequence is ``max_seqlen`` (the grids depend on it)."""
    return [[PAD_TOKEN_ID] * shape.max_seqlen]


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    static: PackedBatch  # the graph's inputs, refilled before each replay
    x: torch.Tensor  # outputs: [tokens, hidden] last block output and residual stream
    residual: torch.Tensor


class BucketedForward:
    """``model.hidden_before_norm`` of small batches, padded to a :class:`BucketShape`, through CUDA
    graphs (``graphs=True``, CUDA only) or eagerly (``graphs=False``: the same padding, for tests)."""

    def __init__(
        self, model: torch.nn.Module, *, graphs: bool, token_buckets: Sequence[int] = TOKEN_BUCKETS,
        max_sequences: int = MAX_SEQUENCES,
    ) -> None:
        self.model = model
        self.graphs = graphs
        self.token_buckets = tuple(sorted(token_buckets))
        self.max_sequences = max_sequences
        self._graphs: dict[BucketShape, _Graph] = {}
        if graphs:
            if self.device.type != "cuda":
                raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
            self._pool = torch.cuda.graph_pool_handle()
            # One side stream for every warm-up forward: blocks cached for a stream serve only it.
            self._stream = torch.cuda.Stream(self.device)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def captured(self) -> list[BucketShape]:
        return sorted(self._graphs)

    def shape(self, seqlens: Sequence[int]) -> BucketShape | None:
        return bucket_shape(seqlens, self.token_buckets, self.max_sequences)

    def __call__(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, PackedBatch] | None:
        """``(x, residual, batch)`` for the real rows of ``sequences`` (x, residual: [real tokens,
        hidden], as ``hidden_before_norm`` of the unpadded batch), or None when no bucket holds them.

        With graphs the outputs are the graph's own buffers: valid until the next replay of that
        graph, which the stream orders after every read already queued."""
        shape = self.shape([len(s) for s in sequences])
        if shape is None:
            return None
        n_real = sum(len(s) for s in sequences)
        if not self.graphs:
            padded = pack_padded(sequences, shape, self.device)
            x, residual = self.model.hidden_before_norm(padded)
            return x[:n_real], residual[:n_real], padded
        graph = self._graphs.get(shape) or self._capture(shape)
        ids, positions, cu, lengths = padded_host_tensors(sequences, shape)
        static = graph.static
        # Straight from pinned host memory into the graph's inputs, the attention work lists too;
        # queued before the replay.
        for dst, src in ((static.input_ids, ids), (static.positions, positions), (static.cu_seqlens, cu)):
            dst.copy_(src.pin_memory(), non_blocking=True)
        static.refill_attention_plans(lengths)
        graph.graph.replay()
        return graph.x[:n_real], graph.residual[:n_real], graph.static

    def capture_all(self, max_length: int) -> list[BucketShape]:
        """Capture every shape a batch of sequences of at most ``max_length`` tokens can take (largest
        first, so that smaller graphs reuse the pool's blocks). Returns the shapes captured."""
        shapes = set()
        for tokens in self.token_buckets:
            longest = min(tokens, max_length)
            for n in {longest, *(1 << p for p in range(longest.bit_length()) if 1 << p < longest)}:
                shapes.add(shape_for(tokens, n, self.max_sequences))
        shapes = sorted(shapes, reverse=True)
        if self.graphs:
            for shape in shapes:
                if shape not in self._graphs:
                    self._capture(shape)
        return shapes

    @torch.inference_mode()
    def _capture(self, shape: BucketShape) -> _Graph:
        static = pack_padded(_capture_sequences(shape), shape, self.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Outside the capture: Triton compiles and autotunes, cuBLAS allocates its workspace.
            self.model.hidden_before_norm(static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            x, residual = self.model.hidden_before_norm(static)
        self._graphs[shape] = _Graph(graph, static, x, residual)
        return self._graphs[shape]
