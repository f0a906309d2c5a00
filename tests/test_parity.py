"""Engine.encode against transformers + peft, the real thing, for every family.

The reference runs the transformers model class with the peft adapter loaded unmerged, made
bidirectional by an explicit 4-D padding mask, on right-padded batches; the test tokenises, finds the
text tokens from the tokenizer's offsets and pools in float64 by itself.
"""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from _hf_reference import POOLINGS, hf_embeddings

from converters.convert import convert
from converters.tiny_models import save_lora_adapter, save_tiny_checkpoint
from engine import Engine

INPUTS = [
    "the quick brown fox jumps over the lazy dog",
    ("Retrieve a passage that answers the question", "what is attention in a language model?"),
    "river",
    ("  Find relevant scientific claims  ", "kernel memory is fast"),
    " ".join(["mountain city music history science"] * 12),  # longer than the max_length used below
    ("Given a query, retrieve documents", " ".join(["bank loan interest rate"] * 10)),
]
FAMILIES = {
    "llama": {},
    "mistral": {},
    "gemma": {"head_dim": 32},  # decoupled head_dim (4 heads x 32 != hidden 64), tied embeddings
    "qwen2": {"tie_word_embeddings": False},
    "llama31": {  # Llama-3.1 rope scaling, with a short original context so every band is exercised
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "head_dim": 32,
        "num_heads": 2,
        "num_kv_heads": 1,
    },
}
MAX_LENGTH = 24


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(request, tmp_path_factory):
    name = request.param
    family = "llama" if name == "llama31" else name
    root = tmp_path_factory.mktemp(name)
    src = save_tiny_checkpoint(root / "hf", family, seed=len(name), **FAMILIES[name])
    adapter = save_lora_adapter(src, root / "lora", seed=3)
    out = convert(src, root / "engine", loras=[adapter], dtype="float32", quiet=True)
    return src, adapter, out


def reference_embeddings(src, adapter, inputs, pooling, max_length):
    """float64 [batch, hidden] from transformers + peft (adapter unmerged)."""
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    base = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    return hf_embeddings(model.get_base_model().model, tokenizer, inputs, pooling, max_length)


def assert_rel_close(actual, expected, tol):
    err = (actual.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert err.max() <= tol, f"max relative error {err.max():.3e} > {tol:.0e}: {err.tolist()}"


@pytest.mark.parametrize("pooling", POOLINGS)
def test_encode_matches_transformers_and_peft(converted, pooling):
    src, adapter, out = converted
    engine = Engine.from_pretrained(out, dtype=torch.float32, pooling=pooling, max_length=MAX_LENGTH)
    actual = engine.encode(INPUTS, batch_size=4)
    expected = reference_embeddings(src, adapter, INPUTS, pooling, MAX_LENGTH)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert_rel_close(actual, expected, 1e-4)


def test_normalize_gives_unit_rows_in_the_same_direction(converted):
    engine = Engine.from_pretrained(converted[2])
    raw = engine.encode(INPUTS)
    unit = engine.encode(INPUTS, normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(INPUTS)))
    torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_bfloat16_is_close_to_float32(converted):
    """bfloat16 has an 8-bit mantissa; over two layers the embedding's direction must stay within
    a cosine distance of 1e-2 of float32 (stated tolerance: relative error below 5e-2)."""
    out = converted[2]
    f32 = Engine.from_pretrained(out, dtype=torch.float32).encode(INPUTS)
    bf16 = Engine.from_pretrained(out, dtype=torch.bfloat16).encode(INPUTS)
    assert bf16.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(bf16, f32, dim=-1)
    assert cos.min() > 0.99, cos.tolist()
    assert_rel_close(bf16, f32.double(), 5e-2)
