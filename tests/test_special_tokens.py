"""Special tokens are never pooled (the LLM2Vec rule), also where a text spells them literally, while
the model still reads exactly what transformers' tokenizer gives; ``split_special_tokens`` reads such
strings as plain text instead.

The reference is transformers' own model (made bidirectional by an explicit 4-D mask) on the ids of
transformers' own tokenizer, pooled in float64 over positions chosen here from the token strings.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import _checkpoints as ck
from converters.convert import convert
from engine import Engine

SPECIAL = ("<s>", "</s>", "<pad>")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    """(engine dir, transformers model, tokenizer) for a BOS-adding Metaspace and a byte-level tokenizer."""
    src = ck.tiny(request.param)
    out = convert(src, tmp_path_factory.mktemp("special") / "engine", quiet=True)
    model = AutoModel.from_pretrained(str(src), dtype=torch.float32).eval()
    return out, model, AutoTokenizer.from_pretrained(str(src))


def _reference(model, ids: list[int], positions: list[int]) -> torch.Tensor:
    """Mean over ``positions`` of the bidirectional hidden states, float64 [hidden]."""
    x = torch.tensor([ids])
    mask = torch.zeros(1, 1, len(ids), len(ids))  # every query sees every key: bidirectional
    with torch.no_grad():
        hidden = model(input_ids=x, attention_mask=mask).last_hidden_state[0].double()
    return hidden[positions].mean(0)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("text", ["hello </s> world <s>", "the river </s></s> flows", "café and <pad> kernel"])
def test_literal_special_tokens_are_read_but_not_pooled(setup, text):
    path, model, tokenizer = setup
    engine = Engine.from_pretrained(path)
    ids = tokenizer(text)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert any(t in SPECIAL for t in tokens[1:])  # the text really holds literal special tokens
    (tok,) = engine.tokenize([text])
    assert tok.input_ids == ids  # the model reads what transformers gives it
    pooled = [j for j, t in enumerate(tokens) if t not in SPECIAL]  # unknown characters (<unk>) are text
    assert _close(engine.encode(text), _reference(model, ids, pooled)) < 1e-5


def test_split_special_tokens_reads_them_as_text(setup):
    path, model, tokenizer = setup
    engine = Engine.from_pretrained(path, split_special_tokens=True)
    text = "hello </s> world"
    ids = tokenizer(text, split_special_tokens=True)["input_ids"]
    assert tokenizer.eos_token_id not in ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    pooled = [j for j, t in enumerate(tokens) if t not in SPECIAL]  # only the BOS is special now
    (tok,) = engine.tokenize([text])
    assert tok.input_ids == ids
    assert _close(engine.encode(text), _reference(model, ids, pooled)) < 1e-5


def test_a_text_of_special_tokens_only_has_nothing_to_pool(setup):
    path, _, _ = setup
    engine = Engine.from_pretrained(path)
    with pytest.raises(ValueError, match="input 1: no token of its text .* only special tokens"):
        engine.encode(["fine", "<s></s>"])
    assert Engine.from_pretrained(path, split_special_tokens=True).encode(["<s></s>"]).shape == (1, engine.hidden_size)


def test_weighted_mean_skips_special_tokens_and_counts_ranks_over_the_rest(setup):
    path, model, tokenizer = setup
    engine = Engine.from_pretrained(path, pooling="weighted_mean")
    text = "kernel </s> memory fast"
    ids = tokenizer(text)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    pooled = [j for j, t in enumerate(tokens) if t not in SPECIAL]
    x = torch.tensor([ids])
    with torch.no_grad():
        hidden = model(input_ids=x, attention_mask=torch.zeros(1, 1, len(ids), len(ids))).last_hidden_state[0].double()
    w = torch.arange(1, len(pooled) + 1, dtype=torch.float64)
    expected = (hidden[pooled] * w[:, None]).sum(0) / w.sum()
    assert _close(engine.encode(text), expected) < 1e-5
