"""Training data: text and JSONL files read with clear errors, MNTP chunking and masking, batch order.

- Text files (mntp, simcse): one example per line; blank lines are skipped.
- JSONL files (supervised): one object per line,
  ``{"query": str, "positive": str, "negative": str (optional), "instruction": str (optional)}``.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..inputs import Example, TokenizedExample, tokenize, tokenizer_rules
from .config import DataError

IGNORE_INDEX = -100


def _open_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, line ends as in text mode (``\n``, ``\r\n``, ``\r``).

    Decoded whole so that a bad byte is reported as ``FILE:LINE``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):
        yield number, line.rstrip("\n")


def read_texts(path: str | Path) -> list[str]:
    """The non-blank lines of a text file; DataError when missing, unreadable or without text."""
    texts = [line for _, line in _open_lines(path) if line.strip()]
    if not texts:
        raise DataError(f"{path}: no text (the file is empty or blank)")
    return texts


@dataclass(frozen=True)
class Pair:
    """One supervised example: a query (read after its instruction), its positive, an optional hard negative."""

    query: str
    positive: str
    negative: str | None = None
    instruction: str = ""
    line: int = 0


def read_pairs(path: str | Path) -> list[Pair]:
    """Parse a supervised JSONL file; errors name the file and line number."""
    pairs = []
    for number, line in _open_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with query and positive, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"query", "positive", "negative", "instruction"})
        if unknown:
            raise DataError(f"{where}: unknown keys {unknown} (expected query, positive, negative, instruction)")
        for key in ("query", "positive"):
            if key not in obj:
                raise DataError(f"{where}: missing {key!r}")
        for key in ("query", "positive", "negative", "instruction"):
            value = obj.get(key)
            optional = key in ("negative", "instruction")
            if value is None and optional:
                continue
            if not isinstance(value, str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone "\ud800" escape: no tokenizer can read it
                raise DataError(f"{where}: {key!r} has an unpaired surrogate {value[exc.start]!r} at character "
                                f"{exc.start}") from None
            if key != "instruction" and not value.strip():
                raise DataError(f"{where}: {key!r} is empty")
        pairs.append(Pair(obj["query"], obj["positive"], obj.get("negative"), (obj.get("instruction") or "").strip(), number))
    if not pairs:
        raise DataError(f"{path}: no examples (the file is empty or blank)")
    return pairs


# ---------------------------------------------------------------------------------------------------
# Tokenised datasets


@dataclass(frozen=True)
class Chunk:
    """An MNTP training sequence: token ids and which of them are special (never masked)."""

    input_ids: list[int]
    special: list[bool]


def mntp_chunks(tokenizer: Any, texts: Sequence[str], max_seq_length: int) -> list[Chunk]:
    """Tokenise every text with its special tokens, concatenate, split into ``max_seq_length`` chunks.

    As LLM2Vec (run_mlm's ``group_texts``), except that a final shorter chunk is kept (packed batches
    need no padding, so it costs nothing) unless it is a single token.
    """
    enc = tokenizer(list(texts), add_special_tokens=True, return_special_tokens_mask=True, return_attention_mask=False)
    ids = list(chain.from_iterable(enc["input_ids"]))
    special = [bool(s) for s in chain.from_iterable(enc["special_tokens_mask"])]
    chunks = [
        Chunk(ids[i : i + max_seq_length], special[i : i + max_seq_length]) for i in range(0, len(ids), max_seq_length)
    ]
    if chunks and len(chunks[-1].input_ids) < 2:
        chunks.pop()
    return chunks


def text_examples(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[TokenizedExample]:
    """SimCSE sentences, tokenised by the rules ``Engine.encode`` uses (no instruction)."""
    return _tokenize(tokenizer, [Example("", t) for t in texts], max_length)


def _tokenize(tokenizer: Any, examples: list[Example], max_length: int) -> list[TokenizedExample]:
    """``Engine.encode``'s tokenisation and pooled tokens (the LLM2Vec rule) for training examples."""
    return tokenize(tokenizer, examples, tokenizer_rules(tokenizer, max_length, len(tokenizer)))


@dataclass(frozen=True)
class TokenizedPair:
    query: TokenizedExample
    positive: TokenizedExample
    negative: TokenizedExample | None


def pair_examples(tokenizer: Any, pairs: Sequence[Pair], max_length: int, path: str = "") -> list[TokenizedPair]:
    """Supervised pairs tokenised by the ``Engine.encode`` rules: the query after its instruction
    (pooled over the query only), positives and negatives without instruction."""
    queries = [Example.pair(p.instruction, p.query) for p in pairs]
    try:
        q = _tokenize(tokenizer, queries, max_length)
    except ValueError:
        for pair, example in zip(pairs, queries):  # find the line that failed
            try:
                _tokenize(tokenizer, [example], max_length)
            except ValueError:
                raise DataError(
                    f"{path}:{pair.line}: the instruction leaves no query token within max_seq_length={max_length}"
                ) from None
        raise
    pos = _tokenize(tokenizer, [Example("", p.positive) for p in pairs], max_length)
    with_neg = [i for i, p in enumerate(pairs) if p.negative is not None]
    neg_tok = _tokenize(tokenizer, [Example("", pairs[i].negative) for i in with_neg], max_length)
    neg: list[TokenizedExample | None] = [None] * len(pairs)
    for i, t in zip(with_neg, neg_tok):
        neg[i] = t
    return [TokenizedPair(a, b, c) for a, b, c in zip(q, pos, neg)]


# ---------------------------------------------------------------------------------------------------
# MNTP masking


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    mlm_probability: float,
    mask_id: int,
    random_vocab: int,
    all_mask: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select and corrupt MNTP positions, as transformers' DataCollatorForLanguageModeling does.

    ``input_ids`` int64 [n], ``special`` bool [n]. Each non-special position is selected with probability
    ``mlm_probability``; a selected token becomes ``mask_id`` (80%), a random id below ``random_vocab``
    (10%) or stays (10%); ``all_mask`` makes every selected token ``mask_id``. Returns ``(inputs, labels)``
    with labels = the original id at selected positions, :data:`IGNORE_INDEX` elsewhere.
    """
    probs = torch.full(input_ids.shape, float(mlm_probability))
    probs.masked_fill_(special, 0.0)
    selected = torch.bernoulli(probs, generator=generator).bool()
    labels = torch.where(selected, input_ids, IGNORE_INDEX)
    inputs = input_ids.clone()
    if all_mask:
        inputs[selected] = mask_id
        return inputs, labels
    masked = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    inputs[masked] = mask_id
    randomised = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~masked
    inputs[randomised] = torch.randint(random_vocab, input_ids.shape, generator=generator)[randomised]
    return inputs, labels


# ---------------------------------------------------------------------------------------------------
# Batch order


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A per-example seed (MNTP masks depend on the example, not on the batch or the process count)."""
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**63)


class BatchOrder:
    """Which examples each process reads for each micro-batch.

    Every epoch is a permutation seeded by ``(seed, epoch)``, cut into global batches of
    ``batch_size * world`` examples (an incomplete last batch is dropped); process ``rank`` reads the
    ``rank``-th slice of ``batch_size``. The same global batches come out for any process count with
    the same global batch size, and micro-batch ``k`` can be found directly (for resuming).
    """

    def __init__(self, n_examples: int, batch_size: int, world: int, rank: int, seed: int) -> None:
        self.n, self.batch_size, self.world, self.rank, self.seed = n_examples, batch_size, world, rank, seed
        self.global_size = batch_size * world
        self.per_epoch = n_examples // self.global_size
        if self.per_epoch == 0:
            raise DataError(
                f"{n_examples} training examples are fewer than one global batch "
                f"(batch size {batch_size} x {world} process(es)); lower --batch-size or add data"
            )
        self._epoch, self._perm = -1, None

    def __call__(self, k: int) -> tuple[int, list[int]]:
        """``(epoch, example indices)`` of this process's part of micro-batch ``k``."""
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 10_007 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=gen).tolist(), epoch
        start = i * self.global_size + self.rank * self.batch_size
        return epoch, self._perm[start : start + self.batch_size]
