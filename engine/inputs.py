"""Inputs, tokenisation and the pooled span: the rules shared by ``Engine.encode`` and training.

An input is a string ``text`` or a pair ``(instruction, text)``. The model reads
``f"{instruction.strip()} {text}"`` (or ``text`` when the instruction is empty), tokenised with the
checkpoint's tokenizer and its special tokens, truncated to ``max_length``. The pooled tokens are those
whose character span overlaps ``text``: instruction and special tokens are attended to but never pooled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .batch import PackedBatch

# Public pooling mode -> (segment_pool mode, whether the span is the text's tokens or the whole sequence).
POOLING_SPANS = {
    "mean": ("mean", "text"),
    "weighted_mean": ("weighted_mean", "text"),
    "last_token": ("last", "sequence"),
    "bos_token": ("first", "sequence"),
}


@dataclass(frozen=True)
class Example:
    """One validated input: the string the model reads and where ``text`` starts in it."""

    instruction: str
    text: str

    @property
    def model_text(self) -> str:
        return f"{self.instruction} {self.text}" if self.instruction else self.text

    @property
    def text_start(self) -> int:
        return len(self.instruction) + 1 if self.instruction else 0


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one input and the half-open span ``[pool_start, pool_end)`` of its text tokens."""

    input_ids: list[int]
    pool_start: int
    pool_end: int


def parse_inputs(inputs: Sequence[Any]) -> list[Example]:
    """Validate ``inputs``; raise TypeError/ValueError naming the index of the first bad one."""
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a list of strings or (instruction, text) pairs, got {type(inputs).__name__}")
    examples = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            instruction, text = "", item
        elif isinstance(item, (list, tuple)):
            if len(item) != 2:
                raise ValueError(f"input {i}: a pair must be (instruction, text), got {len(item)} elements")
            instruction, text = item
            if not isinstance(instruction, str) or not isinstance(text, str):
                raise TypeError(
                    f"input {i}: instruction and text must be strings, got "
                    f"({type(instruction).__name__}, {type(text).__name__})"
                )
        else:
            raise TypeError(f"input {i}: expected a string or an (instruction, text) pair, got {type(item).__name__}")
        if not text.strip():
            raise ValueError(f"input {i}: text is empty or whitespace")
        examples.append(Example(instruction.strip(), text))
    return examples


def tokenize(tokenizer: Any, examples: list[Example], max_length: int, require_text: bool = True) -> list[TokenizedExample]:
    """Tokenise all examples in one call of a fast tokenizer and find each one's pooled span.

    With ``require_text`` an input whose text tokens were all truncated away raises ValueError naming it.
    """
    if not examples:
        return []
    enc = tokenizer(
        [e.model_text for e in examples],
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    out = []
    for i, (example, ids, offsets) in enumerate(zip(examples, enc["input_ids"], enc["offset_mapping"])):
        start, end = example.text_start, len(example.model_text)
        # Special tokens have empty (0, 0) spans; instruction tokens end at or before the text's start.
        pooled = [j for j, (s, e) in enumerate(offsets) if e > s and e > start and s < end]
        if not pooled:
            if require_text:
                raise ValueError(
                    f"input {i}: no token of its text is left within max_length={max_length} "
                    "(the instruction fills it)"
                )
            pooled = [0]
        out.append(TokenizedExample(list(ids), pooled[0], pooled[-1] + 1))
    return out


def pooling_spans(examples: list[TokenizedExample], batch: PackedBatch, pooling: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Packed-row spans for ``pooling``: (starts, ends) int64 [batch] on the batch's device, and the
    ``segment_pool`` mode to apply to them."""
    mode, span = POOLING_SPANS[pooling]
    if span == "sequence":
        return batch.starts, batch.ends, mode
    offsets = torch.tensor([[e.pool_start, e.pool_end] for e in examples], dtype=torch.int64)
    offsets = offsets.to(batch.cu_seqlens.device, non_blocking=True)
    return batch.starts + offsets[:, 0], batch.starts + offsets[:, 1], mode
