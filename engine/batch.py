"""Packed (unpadded) token batches: sequences concatenated along one token axis with ``cu_seqlens``."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from typing import Sequence

import torch

from encoder_kernels.attention import AttentionPlan, PlanCapacity, attention_plan, rows_by_length


@dataclass(frozen=True)
class PackedBatch:
    """A batch of sequences packed into ``[total_tokens]`` with no padding.

    ``input_ids``: int64 [total_tokens]; ``positions``: int64 [total_tokens], restarting at 0 for every
    sequence; ``cu_seqlens``: int32 [batch + 1] prefix sums of the lengths; ``seqlens``: the lengths on
    the host (packing already knows them, so no layer needs a device-to-host copy). ``plan_capacity``:
    set on a CUDA graph's static batch, whose attention work lists then have a fixed shape and are
    rewritten in place for each replay (:meth:`refill_attention_plans`).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    seqlens: tuple[int, ...]
    plan_capacity: PlanCapacity | None = None

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens, default=0)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def starts(self) -> torch.Tensor:
        """int64 [batch]: index of each sequence's first token in the packed axis."""
        return self.cu_seqlens[:-1].long()

    @property
    def ends(self) -> torch.Tensor:
        """int64 [batch]: one past each sequence's last token."""
        return self.cu_seqlens[1:].long()

    @cached_property
    def rows_by_length(self) -> list[torch.Tensor]:
        """int64 [seqs, length] token rows per distinct sequence length, on the batch's device: built
        on the first call (one host-to-device copy per group) and shared by every layer."""
        return rows_by_length(self.seqlens, self.input_ids.device)

    @cached_property
    def _attention_plans(self) -> dict[int, AttentionPlan]:
        return {}

    def attention_plan(self, group: int) -> AttentionPlan:
        """The Triton attention's work list for ``group`` q heads per kv head (every tile height it may
        be tuned to): built from the host lengths on the first call (one host-to-device copy, no
        sync) and shared by every layer."""
        plans = self._attention_plans
        if group not in plans:
            plans[group] = attention_plan(self.seqlens, group, self.input_ids.device, capacity=self.plan_capacity)
        return plans[group]

    def refill_attention_plans(self, seqlens: Sequence[int]) -> None:
        """Rewrite the work lists built so far, in place, for a batch of lengths ``seqlens`` that fits
        ``plan_capacity`` (same shapes, so a captured graph's grids and addresses still hold). The
        copies are queued on the current stream, from pinned memory on CUDA."""
        if self.plan_capacity is None:
            raise ValueError("only a batch with a plan_capacity has work lists that can be refilled")
        for group, plan in self._attention_plans.items():
            work = attention_plan(seqlens, group, "cpu", capacity=self.plan_capacity).work
            if plan.work.device.type == "cuda":
                work = work.pin_memory()
            plan.work.copy_(work, non_blocking=True)


def pack(sequences: list[list[int]], device: torch.device | str = "cpu") -> PackedBatch:
    """Concatenate token-id lists into a :class:`PackedBatch` on ``device`` (one host-to-device copy each)."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot pack an empty sequence")
    seqlens = tuple(len(s) for s in sequences)
    lengths = torch.tensor(seqlens, dtype=torch.int64)
    total = int(lengths.sum())
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu[1:])
    # Position of token t = t - start of its sequence.
    positions = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(cu[:-1].long(), lengths)
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
    device = torch.device(device)

    def upload(t: torch.Tensor) -> torch.Tensor:
        if device.type != "cuda":
            return t.to(device)
        # From pinned memory (PyTorch caches pinned blocks) the copy is truly asynchronous: the host
        # goes on packing the next batch while this one is uploaded and computed.
        return t.pin_memory().to(device, non_blocking=True)

    return PackedBatch(input_ids=upload(ids), positions=upload(positions), cu_seqlens=upload(cu), seqlens=seqlens)
