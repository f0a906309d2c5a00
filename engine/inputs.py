"""Inputs, tokenisation and the pooled tokens: the rules shared by ``Engine.encode``, the server, the
corpus command and training.

An input is a string ``text``, a pair ``(instruction, text)``, or (server and corpus only) a list
of token ids. The model reads ``f"{instruction.strip()} {text}"`` for a pair, ``prompt + text`` with
a named or given prompt (sentence-transformers' rule), else ``text``; tokenised with the checkpoint's
tokenizer and its special tokens, truncated to ``max_length`` (to ``max_length - 1`` then the EOS
token with ``append_eos``).

Pooled tokens (``include_prompt`` False, the LLM2Vec rule): the tokens whose character span overlaps
``text``, found from the fast tokenizer's offsets, minus every special token wherever it occurs (also
one the text spells literally, such as ``"hello </s>"``). Instruction, prompt and special tokens are
attended to but never pooled. With ``include_prompt`` True every token is pooled, as
sentence-transformers does. ``last_token`` pools the sequence's last token, ``bos_token`` its first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .batch import PackedBatch

# Public pooling mode -> (segment_pool mode, whether the span is the pooled tokens or the whole sequence).
POOLING_SPANS = {
    "mean": ("mean", "text"),
    "weighted_mean": ("weighted_mean", "text"),
    "last_token": ("last", "sequence"),
    "bos_token": ("first", "sequence"),
}


class InputTooLong(ValueError):
    """An input longer than the limit, with truncation off (the server answers 413)."""

    def __init__(self, index: int, n_tokens: int, limit: int) -> None:
        super().__init__(f"input {index}: {n_tokens} tokens exceed the limit of {limit} (truncation is off)")
        self.index, self.n_tokens, self.limit = index, n_tokens, limit


@dataclass(frozen=True)
class Example:
    """One validated input: the string the model reads, where ``text`` starts in it, or token ids."""

    prefix: str  # the instruction and its space, or the prompt; excluded from pooling
    text: str
    token_ids: tuple[int, ...] | None = None

    @classmethod
    def pair(cls, instruction: str, text: str) -> "Example":
        """The LLM2Vec rule: ``f"{instruction.strip()} {text}"`` (just ``text`` without an instruction)."""
        instruction = instruction.strip()
        return cls(f"{instruction} " if instruction else "", text)

    @property
    def model_text(self) -> str:
        return self.prefix + self.text

    @property
    def text_start(self) -> int:
        return len(self.prefix)


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one input and the tokens it pools: ``[pool_start, pool_end)`` minus ``holes``
    (positions inside the span that are not pooled: special tokens in the text; almost always empty)."""

    input_ids: list[int]
    pool_start: int
    pool_end: int
    holes: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def parse_inputs(inputs: Sequence[Any], prompt: str | None = None, allow_token_ids: bool = False) -> list[Example]:
    """Validate ``inputs``; raise TypeError/ValueError naming the index of the first bad one.

    ``prompt`` is prepended to every plain text (an input that is an (instruction, text) pair with
    a prompt is refused: one prefix per input). ``allow_token_ids``: an input may be a list of ints.
    """
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a list of strings or (instruction, text) pairs, got {type(inputs).__name__}")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    examples = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            examples.append(Example(prompt or "", _checked_text(i, item)))
            continue
        if allow_token_ids and isinstance(item, (list, tuple)) and item and all(
            isinstance(t, int) and not isinstance(t, bool) for t in item
        ):
            examples.append(Example("", "", tuple(item)))
            continue
        if isinstance(item, (list, tuple)):
            if len(item) != 2:
                raise ValueError(f"input {i}: a pair must be (instruction, text), got {len(item)} elements")
            instruction, text = item
            if not isinstance(instruction, str) or not isinstance(text, str):
                raise TypeError(
                    f"input {i}: instruction and text must be strings, got "
                    f"({type(instruction).__name__}, {type(text).__name__})"
                )
            if prompt:
                raise ValueError(f"input {i}: an (instruction, text) pair and a prompt cannot both be given")
            examples.append(Example.pair(_checked_text(i, instruction, allow_empty=True), _checked_text(i, text)))
            continue
        kind = "a string, an (instruction, text) pair" + (" or a list of token ids" if allow_token_ids else "")
        raise TypeError(f"input {i}: expected {kind}, got {type(item).__name__}")
    return examples


def _checked_text(i: int, text: str, allow_empty: bool = False) -> str:
    if not allow_empty and not text.strip():
        raise ValueError(f"input {i}: text is empty or whitespace")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"input {i}: not valid Unicode text (an unpaired surrogate at character {exc.start})") from None
    return text


@dataclass(frozen=True)
class TokenizerRules:
    """What tokenisation needs to know about the model: limits, the EOS rule and the special ids."""

    max_length: int
    vocab_size: int
    include_prompt: bool = False
    append_eos: bool = False  # append the EOS id after truncating to max_length - 1
    eos_id: int | None = None
    special_ids: frozenset[int] = frozenset()
    special_text: dict[int, str] | None = None  # id -> the literal string that spells the special token
    split_special_tokens: bool = False


def tokenizer_rules(
    tokenizer: Any, max_length: int, vocab_size: int, *, include_prompt: bool = False, append_eos: bool = False,
    split_special_tokens: bool = False,
) -> TokenizerRules:
    """The rules for ``tokenizer``; ``append_eos`` is dropped where the tokenizer appends EOS itself
    (never two)."""
    special = special_tokens(tokenizer)
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError("append_eos: the tokenizer has no EOS token")
    return TokenizerRules(
        max_length=max_length,
        vocab_size=vocab_size,
        include_prompt=include_prompt,
        append_eos=append_eos and not tokenizer_appends_eos(tokenizer),
        eos_id=eos,
        special_ids=frozenset(special),
        special_text=special,
        split_special_tokens=split_special_tokens,
    )


def special_tokens(tokenizer: Any) -> dict[int, str]:
    """Every special token of ``tokenizer``: id -> its literal string."""
    out = {int(i): tok for i, tok in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens)}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            out[int(i)] = str(added.content)
    return out


def tokenizer_appends_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own post-processor ends every sequence with its EOS token (Qwen3-Embedding)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    ids = tokenizer(["a", "b c"], add_special_tokens=True)["input_ids"]
    return all(row and row[-1] == eos for row in ids)


def tokenize(
    tokenizer: Any, examples: list[Example], rules: TokenizerRules, truncate: bool = True, require_text: bool = True
) -> list[TokenizedExample]:
    """Tokenise all examples in one call of a fast tokenizer and find each one's pooled tokens.

    ``truncate`` False: an input longer than ``max_length`` raises :class:`InputTooLong`. With
    ``require_text`` an input whose text tokens were all truncated away raises ValueError naming it.
    """
    if not examples:
        return []
    limit = rules.max_length - 1 if rules.append_eos else rules.max_length
    texts = [(i, e) for i, e in enumerate(examples) if e.token_ids is None]
    encoded: dict[int, tuple[list[int], list[tuple[int, int]] | None]] = {}
    if texts:
        enc = tokenizer(
            [e.model_text for _, e in texts],
            add_special_tokens=True,
            truncation=truncate,
            max_length=limit if truncate else None,
            return_offsets_mapping=True,
            return_attention_mask=False,
            split_special_tokens=rules.split_special_tokens,
        )
        for (i, _), ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
            encoded[i] = (list(ids), list(offsets))
    out = []
    for i, example in enumerate(examples):
        if example.token_ids is not None:
            ids, offsets = list(example.token_ids), None
            bad = next((t for t in ids if not 0 <= t < rules.vocab_size), None)
            if bad is not None:
                raise ValueError(f"input {i}: token id {bad} is outside the vocabulary [0, {rules.vocab_size})")
            if len(ids) > limit:
                if not truncate:
                    raise InputTooLong(i, len(ids) + int(rules.append_eos), rules.max_length)
                ids = ids[:limit]
        else:
            ids, offsets = encoded[i]
            if not truncate and len(ids) > limit:
                raise InputTooLong(i, len(ids) + int(rules.append_eos), rules.max_length)
        if rules.append_eos and rules.eos_id is not None:
            ids.append(rules.eos_id)
            if offsets is not None:
                offsets.append((0, 0))
        out.append(_pooled_tokens(i, example, ids, offsets, rules, require_text))
    return out


def _pooled_tokens(
    i: int, example: Example, ids: list[int], offsets: list[tuple[int, int]] | None, rules: TokenizerRules,
    require_text: bool,
) -> TokenizedExample:
    n = len(ids)
    if rules.include_prompt:
        return TokenizedExample(ids, 0, n)
    special = rules.special_text or {}
    if offsets is None:  # token ids: every non-special token is text
        pooled = [j for j, t in enumerate(ids) if t not in rules.special_ids]
    else:
        start, end, text = example.text_start, len(example.model_text), example.model_text

        def is_special(j: int) -> bool:
            if ids[j] not in rules.special_ids:
                return False
            s, e = offsets[j]
            # Added by the post-processor (empty span), or spelled out in the text: "<unk>" standing
            # for an unknown character covers that character, not its own literal, and is text.
            return s == e or text[s:e] == special.get(ids[j])

        # Instruction and prompt tokens end at or before the text's start.
        pooled = [j for j, (s, e) in enumerate(offsets) if e > s and e > start and s < end and not is_special(j)]
    if not pooled:
        if require_text:
            raise ValueError(
                f"input {i}: no token of its text is left within max_length={rules.max_length} "
                "(the instruction or prompt fills it, or it holds only special tokens)"
            )
        pooled = [0]
    first, last = pooled[0], pooled[-1] + 1
    holes = tuple(sorted(set(range(first, last)) - set(pooled))) if last - first != len(pooled) else ()
    return TokenizedExample(ids, first, last, holes)


@dataclass(frozen=True)
class PoolingPlan:
    """Packed-row spans for one batch: ``starts``/``ends`` int64 [batch] on the batch's device, the
    ``segment_pool`` mode, and ``weights`` float32 [tokens] (None unless some input has holes or the
    weighted mean needs them), all built on the host where the spans are known."""

    starts: torch.Tensor
    ends: torch.Tensor
    mode: str
    weights: torch.Tensor | None = None


def pooling_plan(examples: list[TokenizedExample], batch: PackedBatch, pooling: str) -> PoolingPlan:
    """How ``pooling`` reads the rows of ``batch`` (whose sequences are ``examples``, in order).

    Spans are computed and checked on the host (non-empty, inside each sequence), so the device
    never has to be asked; one host-to-device copy per tensor.
    """
    mode, span = POOLING_SPANS[pooling]
    offsets = [0]
    for e in examples:
        offsets.append(offsets[-1] + e.num_tokens)
    device = batch.input_ids.device
    if span == "sequence":
        starts, ends = offsets[:-1], offsets[1:]
        weights = None
    else:
        starts = [o + e.pool_start for o, e in zip(offsets, examples)]
        ends = [o + e.pool_end for o, e in zip(offsets, examples)]
        for b, (s, e, ex) in enumerate(zip(starts, ends, examples)):
            if not 0 <= ex.pool_start < ex.pool_end <= ex.num_tokens:
                raise ValueError(f"sequence {b}: pooling span [{ex.pool_start}, {ex.pool_end}) is empty or "
                                 f"outside its {ex.num_tokens} tokens")
        weights = None
        if any(e.holes for e in examples):
            w = torch.zeros(offsets[-1], dtype=torch.float32)
            for o, e in zip(offsets, examples):
                holes = set(e.holes)
                rank = 0
                for j in range(e.pool_start, e.pool_end):
                    if j in holes:
                        continue
                    rank += 1
                    w[o + j] = float(rank) if mode == "weighted_mean" else 1.0
            weights = w.to(device, non_blocking=True)
            mode = "mean"  # the weights carry the weighting: sum(w x) / sum(w)
    return PoolingPlan(_on(device, starts), _on(device, ends), mode, weights)


def _on(device: torch.device, values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
