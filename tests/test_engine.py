"""Engine.encode behaviour: batch invariance, order, empty batches, bad inputs, load options."""
import numpy as np
import pytest
import torch

from converters.convert import convert
from converters.tiny_models import sample_sentences, save_tiny_checkpoint
from engine import Engine
from engine.format import FormatError


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    src = save_tiny_checkpoint(root / "hf", "llama", num_layers=2)
    return convert(src, root / "engine", quiet=True)


@pytest.fixture(scope="module")
def engine(engine_dir):
    return Engine.from_pretrained(engine_dir)


def test_embedding_does_not_depend_on_the_batch(engine):
    inputs = sample_sentences(9, seed=3) + [("Retrieve a passage", "the lazy dog"), "x"]
    together = engine.encode(inputs, batch_size=64)
    alone = torch.cat([engine.encode([item]) for item in inputs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    in_pairs = engine.encode(inputs, batch_size=2)
    torch.testing.assert_close(in_pairs, alone, rtol=1e-5, atol=1e-6)


def test_rows_come_back_in_input_order(engine):
    inputs = sample_sentences(12, seed=5, min_words=1, max_words=30)
    forward = engine.encode(inputs, batch_size=3)
    backward = engine.encode(inputs[::-1], batch_size=5)
    torch.testing.assert_close(forward, backward.flip(0), rtol=1e-5, atol=1e-6)


def test_empty_batch_has_hidden_columns(engine):
    out = engine.encode([])
    assert out.shape == (0, engine.hidden_size) and out.dtype == torch.float32


def test_numpy_output(engine):
    out = engine.encode(["a sentence", "another one"], convert_to_numpy=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, engine.hidden_size)


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (["ok", "  "], ValueError, "input 1"),
        (["ok", None], TypeError, "input 1"),
        ([("only",)], ValueError, "input 0"),
        (["ok", "ok", ("a", 5)], TypeError, "input 2"),
    ],
)
def test_bad_input_names_its_index(engine, inputs, error, match):
    with pytest.raises(error, match=match):
        engine.encode(inputs)


def test_bad_options(engine, engine_dir):
    with pytest.raises(ValueError, match="batch_size"):
        engine.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="pooling"):
        Engine.from_pretrained(engine_dir, pooling="max")
    with pytest.raises(ValueError, match="backend"):
        Engine.from_pretrained(engine_dir, backend="tpu")
    with pytest.raises(ValueError, match="max_length"):
        Engine.from_pretrained(engine_dir, max_length=0)


def test_not_an_engine_directory(tmp_path):
    with pytest.raises(FormatError, match="engine_config.json"):
        Engine.from_pretrained(tmp_path)
    with pytest.raises(FormatError, match="no such directory"):
        Engine.from_pretrained(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FormatError, match="not a directory"):
        Engine.from_pretrained(tmp_path / "file")


def test_dtype_none_keeps_the_stored_dtype(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "hf", "qwen2", num_layers=1)
    out = convert(src, tmp_path / "engine", dtype="bfloat16", quiet=True)
    assert Engine.from_pretrained(out, dtype=None).model.embed.weight.dtype == torch.bfloat16
    assert Engine.from_pretrained(out).model.embed.weight.dtype == torch.float32


def test_max_length_override_truncates(engine_dir):
    long_text = " ".join(["mountain river city"] * 40)
    short = Engine.from_pretrained(engine_dir, max_length=8)
    # Both inputs share their first 8 tokens, so truncation makes them the same input.
    same = short.encode([long_text, long_text + " and a different ending"])
    torch.testing.assert_close(same[0], same[1])
    full = Engine.from_pretrained(engine_dir).encode([long_text, long_text + " and a different ending"])
    assert not torch.allclose(full[0], full[1])


def test_plan_batches_respects_both_bounds():
    from engine.encoder import plan_batches

    lengths = [5, 100, 7, 30, 30, 1, 64, 2]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 64
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)  # longest first
    assert [lengths[i] for i in batches[0]] == [100]  # too long for the budget: alone


def test_one_string_gives_one_vector(engine):
    vector = engine.encode("one sentence")
    assert vector.shape == (engine.hidden_size,)
    torch.testing.assert_close(vector, engine.encode(["one sentence"])[0])
    assert engine.encode("one sentence", convert_to_numpy=True).shape == (engine.hidden_size,)


def test_repr_says_what_is_loaded(engine, engine_dir):
    text = repr(engine)
    for part in (str(engine_dir), "family='llama'", f"hidden_size={engine.hidden_size}", "dtype=float32",
                 "device='cpu'", "backend='cpu'", "pooling='mean'"):
        assert part in text, (part, text)


def test_progress_bar_counts_inputs(engine, capsys):
    engine.encode(sample_sentences(9, seed=2), batch_size=4, show_progress_bar=True)
    err = capsys.readouterr().err
    assert "9/9" in err and "input" in err  # three batches, nine inputs


@pytest.mark.parametrize("option", ["normalize", "show_progress_bar", "convert_to_numpy"])
def test_encode_flags_must_be_booleans(engine, option):
    with pytest.raises(TypeError, match=option):
        engine.encode(["a sentence"], **{option: "yes"})


def test_an_unpaired_surrogate_names_its_input(engine):
    with pytest.raises(ValueError, match="input 1: not valid Unicode text"):
        engine.encode(["fine", "broken \ud800 text"])
    with pytest.raises(ValueError, match="input 0: not valid Unicode text"):
        engine.encode([("instruction \udfff", "text")])


def test_warmup_without_triton_runs_one_short_forward(engine_dir, monkeypatch):
    """The CPU backend compiles nothing: its warm-up is one short forward, however long max_length is
    (a sweep of powers of two up to 32k tokens took minutes on a CPU); the reference backend alike."""
    for backend in ("cpu", "reference"):
        engine = Engine.from_pretrained(engine_dir, backend=backend, max_length=4096,
                                        allow_beyond_max_positions=True)
        seen = []
        real = engine.embed_tokenized
        monkeypatch.setattr(engine, "embed_tokenized", lambda items: seen.append([t.num_tokens for t in items])
                            or real(items))
        assert engine.warmup() == [16]
        assert len(seen) == 1 and max(seen[0]) <= 16, seen  # one forward, of short inputs
