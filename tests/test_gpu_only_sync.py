"""The fast path queues a whole batch without one device-to-host synchronisation (GPU only).

``Engine._launch`` packs, uploads, runs the forward (eagerly or from a CUDA graph), pools and queues
the copy of the rows into pinned memory; only ``result()`` waits. Under
``torch.cuda.set_sync_debug_mode("error")`` any synchronising call inside it (``.item()``,
``.tolist()`` of a device tensor, a blocking copy, ``nonzero``) raises.
"""
import pytest
import torch

from _checkpoints import tiny
from converters.convert import convert
from converters.tiny_models import sample_sentences
from engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA synchronisation checks")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return convert(tiny("llama"), tmp_path_factory.mktemp("sync") / "engine", quiet=True)


def _batches(engine):
    small = engine.tokenize(sample_sentences(6, seed=5, min_words=1, max_words=20))  # a graph bucket
    large = engine.tokenize([[7 + i] * 400 for i in range(8)], allow_token_ids=True)  # 3,200 tokens: eager
    return {"small": small, "large": large}


@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "last_token"])
def test_a_batch_is_queued_without_synchronising(engine_dir, cuda_graphs, pooling):
    engine = Engine.from_pretrained(engine_dir, device="cuda", dtype=torch.bfloat16, backend="triton",
                                    pooling=pooling, cuda_graphs=cuda_graphs)
    reference = Engine.from_pretrained(engine_dir, device="cuda", dtype=torch.bfloat16, backend="reference",
                                       pooling=pooling)
    engine.warmup(max_batch_tokens=4096)
    for name, items in _batches(engine).items():
        engine.embed_tokenized(items)  # first use of this shape: compiles, tunes, captures
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = engine._launch(items, True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows = pending.result()
        expected = reference.embed_tokenized(items, normalize=True)
        cos = torch.nn.functional.cosine_similarity(rows, expected, dim=-1)
        assert cos.min() > 0.99, (name, cos)
