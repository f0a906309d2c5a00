"""Input validation, the model text, and the pooled span computed from tokenizer offsets."""
import pytest

from converters.tiny_models import train_tokenizer
from engine.batch import pack
from engine.inputs import Example, parse_inputs, pooling_plan, tokenize, tokenizer_rules


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tokenizer(request, tmp_path_factory):
    """A Metaspace tokenizer that prepends BOS (Llama-like) and a byte-level one without BOS (Qwen2-like)."""
    return train_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


def test_strings_and_pairs_are_parsed():
    examples = parse_inputs(["plain text", ("  Retrieve a passage  ", "a query"), ["", "no instruction"]])
    assert [e.model_text for e in examples] == ["plain text", "Retrieve a passage a query", "no instruction"]
    assert [e.text_start for e in examples] == [0, len("Retrieve a passage "), 0]


@pytest.mark.parametrize(
    "bad, error, index",
    [
        (["ok", ""], ValueError, 1),
        (["ok", "   \n"], ValueError, 1),
        (["ok", "fine", None], TypeError, 2),
        ([3], TypeError, 0),
        (["ok", ("only one",)], ValueError, 1),
        (["ok", ("a", "b", "c")], ValueError, 1),
        ([("instruction", None)], TypeError, 0),
        ([("instruction", "  ")], ValueError, 0),
    ],
)
def test_bad_inputs_name_their_index(bad, error, index):
    with pytest.raises(error, match=rf"input {index}\b"):
        parse_inputs(bad)


def test_a_bare_string_is_not_a_batch():
    with pytest.raises(TypeError, match="list"):
        parse_inputs("a sentence")


def rules(tokenizer, max_length, **kwargs):
    return tokenizer_rules(tokenizer, max_length, len(tokenizer), **kwargs)


def _decoded_pool(tokenizer, tok):
    return tokenizer.decode(tok.input_ids[tok.pool_start : tok.pool_end])


def test_pooled_span_covers_exactly_the_text(tokenizer):
    examples = parse_inputs([("Retrieve a passage that answers", "the quick brown fox"), "the quick brown fox"])
    with_instr, plain = tokenize(tokenizer, examples, rules(tokenizer, 64))
    # The instruction's tokens come first and are skipped; the text's tokens are all pooled.
    assert _decoded_pool(tokenizer, with_instr).strip() == "the quick brown fox"
    assert _decoded_pool(tokenizer, plain).strip() == "the quick brown fox"
    assert with_instr.pool_end == len(with_instr.input_ids)
    # Special tokens are never pooled: a BOS-adding tokenizer starts the plain text's pool at 1.
    has_bos = plain.input_ids[0] == tokenizer.bos_token_id
    assert plain.pool_start == (1 if has_bos else 0)


def test_truncation_keeps_max_length_tokens(tokenizer):
    long_text = " ".join(["mountain river"] * 100)
    (tok,) = tokenize(tokenizer, [Example("", long_text)], rules(tokenizer, 9))
    assert len(tok.input_ids) == 9 and tok.pool_end == 9


def test_instruction_filling_max_length_is_an_error(tokenizer):
    examples = parse_inputs(["fine", (" ".join(["retrieve relevant passage"] * 20), "text")])
    with pytest.raises(ValueError, match="input 1: no token of its text"):
        tokenize(tokenizer, examples, rules(tokenizer, 8))
    # Last-token and BOS pooling do not read the text's span, so they accept it.
    assert len(tokenize(tokenizer, examples, rules(tokenizer, 8), require_text=False)) == 2


def test_pooling_spans_are_offset_into_the_packed_batch(tokenizer):
    examples = parse_inputs([("Find the answer", "river"), "kernel memory fast"])
    toks = tokenize(tokenizer, examples, rules(tokenizer, 32))
    batch = pack([t.input_ids for t in toks])
    first = len(toks[0].input_ids)
    plan = pooling_plan(toks, batch, "mean")
    assert plan.mode == "mean" and plan.weights is None
    assert plan.starts.tolist() == [toks[0].pool_start, first + toks[1].pool_start]
    assert plan.ends.tolist() == [toks[0].pool_end, first + toks[1].pool_end]
    plan = pooling_plan(toks, batch, "last_token")
    assert (plan.mode, plan.starts.tolist(), plan.ends.tolist()) == ("last", [0, first], [first, batch.num_tokens])
    plan = pooling_plan(toks, batch, "bos_token")
    assert plan.mode == "first" and plan.starts.tolist() == [0, first]


def test_pack_restarts_positions_per_sequence():
    batch = pack([[5, 6, 7], [8], [9, 10]])
    assert batch.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert batch.seqlens == (3, 1, 2) and batch.max_seqlen == 3
    with pytest.raises(ValueError, match="empty"):
        pack([[1], []])
