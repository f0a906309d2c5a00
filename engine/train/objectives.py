"""The three LLM2Vec objectives on the engine's packed reference forward.

- MNTP: masked next-token prediction. Attention is bidirectional; the token at a selected position i
  is predicted from the LM head's logits at position i - 1 of the same sequence (the causal-LM shift),
  and only selected positions count. Position 0 of a sequence has no predecessor and never counts.
- SimCSE: two dropout views of each sentence; cosine similarities times ``scale`` are the logits of a
  cross-entropy whose targets are the diagonal (the other sentences are the negatives).
- Supervised: each query against all positives and all hard negatives of the batch, cosine times
  ``scale``, target = its own positive.

Contrastive losses take a ``gather`` function: the identity on one process, an all-gather with
gradient under data parallelism, so negatives come from the global batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..batch import PackedBatch, pack
from ..inputs import TokenizedExample, pooling_plan
from ..model import EncoderModel
from .data import IGNORE_INDEX

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def mntp_targets(labels: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, targets)``: the packed rows whose LM-head output predicts each counted label, and the
    labels. ``labels``: int64 [tokens], :data:`IGNORE_INDEX` where not selected. Row = position - 1."""
    counted = (labels != IGNORE_INDEX) & (batch.positions > 0)
    where = counted.nonzero().squeeze(1)
    return where - 1, labels[where]


def mntp_loss(model: EncoderModel, batch: PackedBatch, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the counted MNTP positions of ``batch`` (input ids already masked).

    Only the rows that predict something go through the LM head ([counted, vocab], not [tokens, vocab]).
    ``vocab_size`` cuts off logits of tokens added for training (a new mask token).
    """
    hidden = model(batch)
    rows, targets = mntp_targets(labels, batch)
    if rows.numel() == 0:
        return hidden.sum() * 0.0  # nothing selected: a zero that still has a graph
    logits = model.logits(hidden[rows])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> float32; float64 stays
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    return F.cross_entropy(logits, targets)


def embed(model: EncoderModel, items: Sequence[TokenizedExample], pooling: str = "mean", dropout_p: float = 0.0) -> torch.Tensor:
    """Pooled float32 [len(items), hidden] by the pooling rules ``Engine.encode`` uses (``pooling_spans``
    and the backend's ``pool``), through autograd."""
    batch = pack([t.input_ids for t in items], model.embed.weight.device)
    hidden = model(batch, dropout_p)
    return model.ops.pool(hidden, pooling_plan(list(items), batch, pooling), False)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosine similarities, in float32 (float64 stays float64)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return F.normalize(a.to(dtype), dim=-1) @ F.normalize(b.to(dtype), dim=-1).T


def simcse_loss(view1: torch.Tensor, view2: torch.Tensor, scale: float = 20.0, gather: Gather = _identity) -> torch.Tensor:
    """``CE(scale * cos(view1_i, view2_j), target j = i)`` over the (gathered) batch.

    ``view1``, ``view2``: [batch, hidden], two dropout views of the same sentences.
    """
    a, b = gather(view1), gather(view2)
    logits = cosine_matrix(a, b) * scale
    return F.cross_entropy(logits, torch.arange(len(a), device=logits.device))


def supervised_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    scale: float = 50.0,
    gather: Gather = _identity,
) -> torch.Tensor:
    """``CE(scale * cos(q_i, [all positives; all hard negatives]), target = i)`` over the (gathered) batch.

    ``query``, ``positive``: [batch, hidden]; ``negative``: [n_neg, hidden] (any count, possibly none).
    """
    if negative is None:
        negative = positive[:0]
    q, p, n = gather(query), gather(positive), gather(negative)
    logits = cosine_matrix(q, torch.cat([p, n])) * scale
    return F.cross_entropy(logits, torch.arange(len(q), device=logits.device))
