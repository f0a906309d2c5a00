"""Data parallelism under ``torchrun``: process group set-up, an all-gather with gradient, gradient averaging.

``torchrun --nproc_per_node N -m engine.train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; each process
trains on its slice of every global batch. Contrastive losses gather the embeddings of all processes
(:func:`gather`) so that every process computes the same global-batch loss with negatives from the
whole global batch, as LLM2Vec does; the gradient of the gathered rows flows back to the process that
produced them (summed over processes, then averaged with the parameter gradients, which gives exactly
the gradient of the global loss).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..device import resolve_device
from .config import TrainError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU); pick the device.

    ``device``: ``auto``, ``cpu``, ``cuda`` (``cuda:LOCAL_RANK``) or ``cuda:N``; anything else, or CUDA
    on a machine without it, is a :class:`TrainError` naming ``--device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = resolve_device(device, "--device")
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        if dev.type == "cuda" and device.strip() == "cuda":  # one GPU per process under torchrun
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, dev)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(ctx: Context, obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every process's [n_r, ...] rows (sizes may differ); backward sums the incoming
    gradient over processes and returns this process's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        sizes_t = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes_t, size)
        sizes = [int(s.item()) for s in sizes_t]
        width = max(sizes)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows of ``x`` concatenated in rank order, differentiable; ``x`` itself on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def average_gradients(ctx: Context, params: list[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over processes (one flat all-reduce)."""
    if not ctx.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def mean_over_processes(ctx: Context, value: float) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world


def broadcast_parameters(ctx: Context, params: list[torch.nn.Parameter]) -> None:
    """Rank 0's values for ``params`` everywhere (identical starting adapters)."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)
