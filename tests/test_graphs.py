"""CUDA graphs for small batches (engine/graphs.py).

On any machine: the bucket shapes hold every batch they claim (real sequences first, dummies no longer
than the bucket's max_seqlen, a fixed slot count), and a batch padded to its bucket gives the
embeddings of the unpadded batch, through the same padding code the graphs replay, run eagerly. On a
GPU: graph capture and replay against the eager fast path.
"""
import random

import pytest
import torch

from _checkpoints import tiny
from converters.convert import convert
from converters.tiny_models import sample_sentences
from engine import Engine
from engine.graphs import MAX_SEQUENCES, TOKEN_BUCKETS, BucketedForward, bucket_shape, pack_padded

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a GPU: CUDA graph capture and replay")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    src = tiny("llama")  # the suite's shared tiny checkpoint (GQA ratio 2)
    return convert(src, tmp_path_factory.mktemp("graphs") / "engine", quiet=True)


def _random_lengths(rng: random.Random, n: int, longest: int) -> list[int]:
    return [rng.randint(1, longest) for _ in range(n)]


def test_bucket_shapes_hold_their_batches():
    rng = random.Random(0)
    for _ in range(100):
        lengths = _random_lengths(rng, rng.randint(1, 70), rng.choice([4, 40, 300, 1500]))
        shape = bucket_shape(lengths)
        total = sum(lengths)
        if len(lengths) > MAX_SEQUENCES or total > max(TOKEN_BUCKETS):
            assert shape is None
            continue
        assert shape.tokens == min(b for b in TOKEN_BUCKETS if b >= total)
        assert max(lengths) <= shape.max_seqlen <= shape.tokens
        batch = pack_padded([[5] * n for n in lengths], shape)
        seqlens = list(batch.seqlens)
        assert len(seqlens) == shape.slots and batch.cu_seqlens.shape == (shape.slots + 1,)
        assert seqlens[: len(lengths)] == lengths  # the real sequences first, in order
        dummies = seqlens[len(lengths):]
        assert all(0 <= n <= shape.max_seqlen for n in dummies)
        assert sum(seqlens) == shape.tokens == batch.input_ids.shape[0]
        assert batch.cu_seqlens.tolist() == [sum(seqlens[:i]) for i in range(len(seqlens) + 1)]
        # Positions restart at 0 in every sequence, dummies included.
        expected = [p for n in seqlens for p in range(n)]
        assert batch.positions.tolist() == expected


def test_no_bucket_for_oversized_batches():
    assert bucket_shape([]) is None
    assert bucket_shape([1] * (MAX_SEQUENCES + 1)) is None
    assert bucket_shape([max(TOKEN_BUCKETS) + 1]) is None
    assert bucket_shape([max(TOKEN_BUCKETS)]).tokens == max(TOKEN_BUCKETS)


def _items(engine, n, rng):
    texts = sample_sentences(n, seed=rng.randint(0, 10**6), min_words=1, max_words=rng.choice([3, 12, 30]))
    return engine.tokenize(texts)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_padded_batches_give_the_unpadded_embeddings(engine_dir, backend):
    """The padding the graphs replay, run eagerly on the CPU: every real row as without padding."""
    engine = Engine.from_pretrained(engine_dir, dtype=torch.float32, backend=backend)
    padded = Engine.from_pretrained(engine_dir, dtype=torch.float32, backend=backend)
    padded._buckets = BucketedForward(padded.model, graphs=False, token_buckets=(16, 64, 256))
    rng = random.Random(1)
    for n in (1, 2, 5, 9):
        items = _items(engine, n, rng)
        assert padded._buckets.shape([t.num_tokens for t in items]) is not None
        expected = engine.embed_tokenized(items)
        actual = padded.embed_tokenized(items)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_padded_batches_bfloat16_match_within_rounding(engine_dir):
    """In bfloat16 the padded rows may round differently only through matrix products of another
    row count: the padded embeddings stay within bfloat16 rounding of the unpadded ones."""
    engine = Engine.from_pretrained(engine_dir, dtype=torch.bfloat16, backend="cpu")
    padded = Engine.from_pretrained(engine_dir, dtype=torch.bfloat16, backend="cpu")
    padded._buckets = BucketedForward(padded.model, graphs=False, token_buckets=(64, 256))
    items = _items(engine, 6, random.Random(2))
    expected, actual = engine.embed_tokenized(items), padded.embed_tokenized(items)
    cos = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
    assert cos.min() > 0.999, cos


def test_cuda_graphs_option(engine_dir):
    engine = Engine.from_pretrained(engine_dir)
    assert not engine.cuda_graphs  # off on the CPU by default
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device and the triton backend"):
        Engine.from_pretrained(engine_dir, device="cpu", cuda_graphs=True)
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        Engine.from_pretrained(engine_dir, cuda_graphs="yes")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_matches_eager(engine_dir, dtype):
    """Captured once per shape, replayed with new contents: the rows of the padded eager forward, and
    the unpadded eager rows within the dtype's rounding."""
    graphs = Engine.from_pretrained(engine_dir, device="cuda", dtype=dtype, backend="triton")
    assert graphs.cuda_graphs
    eager = Engine.from_pretrained(engine_dir, device="cuda", dtype=dtype, backend="triton", cuda_graphs=False)
    padded = Engine.from_pretrained(engine_dir, device="cuda", dtype=dtype, backend="triton", cuda_graphs=False)
    padded._buckets = BucketedForward(padded.model, graphs=False)
    graphs.warmup(max_batch_tokens=512)
    captured = len(graphs._buckets.captured)
    assert captured >= len(TOKEN_BUCKETS)
    rng = random.Random(3)
    for round_ in range(3):  # the same shapes again: replays, no new capture
        for n in (1, 3, 8, 20):
            items = _items(eager, n, random.Random(rng.randint(0, 100) if round_ else n))
            got = graphs.embed_tokenized(items)
            torch.testing.assert_close(got, padded.embed_tokenized(items), rtol=1e-5, atol=1e-5)
            tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
            torch.testing.assert_close(got, eager.embed_tokenized(items), **tol)
    assert len(graphs._buckets.captured) == captured
    # encode keeps one batch in flight: consecutive batches replaying graphs stay correct.
    texts = sample_sentences(150, seed=4, min_words=1, max_words=20)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(graphs.encode(texts, batch_size=16), eager.encode(texts, batch_size=16), **tol)
