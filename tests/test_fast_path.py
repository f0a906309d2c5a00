"""The whole engine through every Triton kernel against the reference path.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), on tiny models; with CUDA the same comparison runs on the GPU in bfloat16.
"""
import pytest
import torch

from converters.convert import convert
from converters.tiny_models import sample_sentences, save_tiny_checkpoint
from engine import Engine

INPUTS = sample_sentences(5, seed=11, min_words=1, max_words=14) + [
    ("Retrieve a passage that answers", "why is the sky blue"),
    "x",
]
MODELS = {
    "llama": dict(hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=64),  # GQA ratio 2
    "gemma": dict(hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=32),  # offset norm, tanh-GELU
    "qwen2": dict(hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=16),  # q/k/v bias, ratio 4
}


@pytest.fixture(scope="module", params=list(MODELS))
def engine_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = save_tiny_checkpoint(root / "hf", request.param, num_layers=2, intermediate_size=96, **MODELS[request.param])
    return convert(src, root / "engine", quiet=True)


# Every pooling mode on one family; one mode on each other family (the pooling kernels do not depend
# on the family, and every interpreted forward costs seconds).
FLOAT32_CASES = [("llama", p) for p in ("mean", "weighted_mean", "last_token", "bos_token")] + [
    ("gemma", "last_token"), ("qwen2", "mean")]


@pytest.mark.parametrize("engine_dir, pooling", FLOAT32_CASES, indirect=["engine_dir"])
def test_triton_backend_matches_reference_float32(engine_dir, pooling):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = Engine.from_pretrained(engine_dir, device=device, dtype=torch.float32, backend="reference", pooling=pooling)
    fast = Engine.from_pretrained(engine_dir, device=device, dtype=torch.float32, backend="triton", pooling=pooling)
    assert fast.model.ops.name == "triton"
    expected = ref.encode(INPUTS, normalize=True)
    actual = fast.encode(INPUTS, normalize=True)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 fast path needs a GPU (interpreter bf16 dot is wrong)")
def test_triton_backend_bfloat16_on_gpu(engine_dir):
    """bf16 fast path against float64-accurate float32 reference: within 2x the bf16 reference's error."""
    f32 = Engine.from_pretrained(engine_dir, device="cuda", dtype=torch.float32, backend="reference").encode(INPUTS)
    ref = Engine.from_pretrained(engine_dir, device="cuda", dtype=torch.bfloat16, backend="reference").encode(INPUTS)
    fast = Engine.from_pretrained(engine_dir, device="cuda", dtype=torch.bfloat16, backend="triton").encode(INPUTS)
    ref_err = (ref - f32).norm(dim=-1).max()
    fast_err = (fast - f32).norm(dim=-1).max()
    assert fast_err <= 2 * ref_err + 1e-3 * f32.norm(dim=-1).max(), (fast_err, ref_err)


def test_default_backend_on_cpu_is_cpu(engine_dir):
    assert Engine.from_pretrained(engine_dir, device="cpu").model.ops.name == "cpu"


def test_triton_backend_refuses_dropout(engine_dir):
    from engine.batch import pack

    fast = Engine.from_pretrained(engine_dir, backend="triton", device="cuda" if torch.cuda.is_available() else "cpu")
    batch = pack([[1, 5, 6]], fast.device)
    with pytest.raises(ValueError, match="dropout"):
        fast.model(batch, dropout_p=0.1)
