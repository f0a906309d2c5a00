"""Benchmark corpora whose token counts are exact: every text tokenises to the length asked for.

Texts are runs of words: the small dictionary of ``converters.tiny_models.sample_sentences`` (one
token each with the benchmark tokenizer) mixed with random letter strings (several tokens each, so
that many distinct token ids appear). A word's token count is measured once, in isolation; with a
Metaspace/SentencePiece-style tokenizer each word is its own pre-token, so a text's count is the sum
plus the special tokens (BOS). Every text is then tokenised as a whole to check the count, and fixed
up word by word where it differs, so the lengths below are exact, special tokens included.

Three corpora (sizes per device in :data:`SIZES`):

- ``short``: every input 32 tokens;
- ``long``: every input ``long_len`` tokens (512 on a GPU; 128 on CPU to stay within the time budget);
- ``skewed``: 90% of inputs uniform in 8..64 tokens, 10% near ``long_len`` (within its last 1/16),
  shuffled, the way real retrieval corpora mix queries and passages.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from converters.tiny_models import sample_sentences

CORPORA = ("short", "long", "skewed")
SHORT_LEN = 32


@dataclass(frozen=True)
class CorpusSize:
    """How many inputs each corpus has on one kind of device."""

    n_short: int
    n_long: int
    n_skewed: int


# GPU sizes give each encode call 65k-130k tokens (tenths of a second for 4 layers of a 7B shape);
# CPU sizes keep the whole CPU suite within its 3-minute budget.
SIZES = {"cuda": CorpusSize(n_short=2048, n_long=256, n_skewed=1024), "cpu": CorpusSize(n_short=256, n_long=64, n_skewed=256)}


@dataclass(frozen=True)
class Corpus:
    name: str
    label: str  # human-readable, with the lengths
    texts: list[str]
    lengths: list[int]  # exact token count of each text, special tokens included

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)


def corpus_lengths(name: str, size: CorpusSize, long_len: int, seed: int = 0) -> list[int]:
    """Token counts of the inputs of corpus ``name``, in corpus (shuffled) order."""
    rng = random.Random(seed)
    if name == "short":
        return [SHORT_LEN] * size.n_short
    if name == "long":
        return [long_len] * size.n_long
    if name == "skewed":
        n_long = max(1, size.n_skewed // 10)
        near = max(1, long_len // 16)
        lengths = [rng.randint(8, 64) for _ in range(size.n_skewed - n_long)]
        lengths += [rng.randint(long_len - near + 1, long_len) for _ in range(n_long)]
        rng.shuffle(lengths)
        return lengths
    raise ValueError(f"unknown corpus {name!r}; expected one of {CORPORA}")


def corpus_label(name: str, size: CorpusSize, long_len: int) -> str:
    if name == "short":
        return f"uniform {SHORT_LEN} tok x {size.n_short}"
    if name == "long":
        return f"uniform {long_len} tok x {size.n_long}"
    near = max(1, long_len // 16)
    return f"skewed x {size.n_skewed}: 90% 8-64 tok, 10% {long_len - near + 1}-{long_len} tok"


def build_corpus(tokenizer: Any, name: str, size: CorpusSize, long_len: int, seed: int = 0) -> Corpus:
    lengths = corpus_lengths(name, size, long_len, seed)
    texts = texts_with_lengths(tokenizer, lengths, seed=seed + 1)
    return Corpus(name, corpus_label(name, size, long_len), texts, lengths)


def texts_with_lengths(tokenizer: Any, lengths: list[int], seed: int = 0) -> list[str]:
    """One text per entry of ``lengths`` that ``tokenizer`` (with its special tokens) turns into
    exactly that many tokens. Raises ValueError if a length cannot be met."""
    rng = random.Random(seed)
    n_special = len(tokenizer("river")["input_ids"]) - len(tokenizer("river", add_special_tokens=False)["input_ids"])
    dictionary = sorted({w.strip(".?!").lower() for s in sample_sentences(500, seed=seed) for w in s.split()})
    made_up = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(2000)]
    vocab = dictionary + made_up
    counts = dict(zip(vocab, (len(ids) for ids in tokenizer(vocab, add_special_tokens=False)["input_ids"])))
    singles = [w for w in vocab if counts[w] == 1]
    if not singles:
        raise ValueError("the tokenizer has no single-token word to fill texts with")

    words_per_text = []
    for length in lengths:
        need = length - n_special
        if need < 1:
            raise ValueError(f"a text of {length} tokens leaves no room beside {n_special} special tokens")
        words, total = [], 0
        while total < need:
            # Mostly dictionary words, some made-up ones; top up with single-token words at the end.
            w = rng.choice(made_up) if rng.random() < 0.3 else rng.choice(dictionary)
            if total + counts[w] > need:
                w = rng.choice(singles)
            words.append(w)
            total += counts[w]
        words_per_text.append(words)

    texts = [" ".join(words) for words in words_per_text]
    actual = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    for i, (length, n) in enumerate(zip(lengths, actual)):
        words = words_per_text[i]
        for _ in range(4 * length):  # rare: a word tokenises differently in context
            if n == length:
                break
            if n > length and len(words) > 1:
                words.pop()
            else:
                words.append(rng.choice(singles))
            texts[i] = " ".join(words)
            n = len(tokenizer(texts[i])["input_ids"])
        if n != length:
            raise ValueError(f"could not build a text of exactly {length} tokens (got {n})")
    return texts
