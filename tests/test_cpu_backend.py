"""The CPU backend (engine/cpu_ops.py): the reference's arithmetic, in place and in blocks.

Each op is compared with the reference op it replaces on fresh random inputs, with the block sizes
shrunk so that several blocks run. The element-wise ops and attention compute the same operations in
the same dtypes, so their values must be identical, not merely close. The MLP runs its matrix
products over blocks of rows, whose float32 rounding may differ with the row count: in float32 it
must agree to float32 rounding, in bfloat16 be as close to a float32 computation as the reference is
(at most 2x its error, FlashAttention's rule). Then whole engines, ``backend="cpu"`` against
``backend="reference"``, on Llama and Gemma layouts, two pooling modes, by the same rules.
"""
import pytest
import torch
import torch.nn.functional as F

from _checkpoints import tiny
from converters.convert import convert
from converters.tiny_models import sample_sentences
from engine import Engine, cpu_ops
from engine.batch import pack
from encoder_kernels.activations import gated_activation_reference
from encoder_kernels.attention import varlen_attention_reference
from encoder_kernels.norms import rms_norm_reference
from encoder_kernels.rotary import rotary_cos_sin, rotary_inv_freq, rotary_reference

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(cpu_ops, "BLOCK_ELEMENTS", 200)  # several blocks even on tiny inputs
    monkeypatch.setattr(cpu_ops, "MLP_BLOCK_ELEMENTS", 1000)


def _same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _f(t):
    return None if t is None else t.float()


def _as_close_as_the_reference(actual, reference, truth):
    """float32: within float32 rounding of the reference; bfloat16: no further from a float32 truth
    than the reference is, within a factor 2."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)
        return
    err = (actual.double() - truth.double()).abs().max()
    ref_err = (reference.double() - truth.double()).abs().max()
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(dtype, offset):
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(37, 24, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(24, generator=g).to(dtype)
    expected = rms_norm_reference(x, w, 1e-6, offset, r)
    normed, summed = cpu_ops.rms_norm(x.clone(), w, 1e-6, offset, r.clone())
    _same(normed, expected[0])
    _same(summed, expected[1])
    alone = x.clone()
    normed, same = cpu_ops.rms_norm(alone, w, 1e-6, offset)
    _same(normed, rms_norm_reference(x, w, 1e-6, offset)[0])
    assert same is alone and torch.equal(alone, x)  # without a residual x is the sum, left untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place(dtype):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(29, (4 + 2 * 2) * 8, generator=g).to(dtype)  # views of a fused projection
    q, k = qkv[:, :32].view(29, 4, 8), qkv[:, 32:48].view(29, 2, 8)
    cos, sin = rotary_cos_sin(torch.arange(29) % 11, rotary_inv_freq(8, 10000.0))
    expected = rotary_reference(q.clone(), k.clone(), cos, sin)
    v_before = qkv[:, 48:].clone()
    out_q, out_k = cpu_ops.rotary_(q, k, cos, sin)
    assert out_q is q and out_k is k
    _same(q, expected[0])
    _same(k, expected[1])
    assert torch.equal(qkv[:, 48:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rotary(dtype):
    from engine.backends import REFERENCE

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(13, 4, 8, generator=g).to(dtype), torch.randn(13, 2, 8, generator=g).to(dtype)
    wq, wk = torch.randn(8, generator=g).to(dtype), torch.randn(8, generator=g).to(dtype)
    cos, sin = rotary_cos_sin(torch.arange(13), rotary_inv_freq(8, 10000.0))
    expected = REFERENCE.qk_norm_rotary(q.clone(), k.clone(), wq, wk, 1e-6, cos, sin)
    actual = cpu_ops.qk_norm_rotary(q.clone(), k.clone(), wq, wk, 1e-6, cos, sin)
    _same(actual[0], expected[0])
    _same(actual[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation(dtype, activation):
    gu = torch.randn(31, 2 * 20, generator=torch.Generator().manual_seed(3)).to(dtype)
    expected = gated_activation_reference(gu, activation)
    _same(cpu_ops.gated_activation(gu.clone(), activation), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp(dtype, bias):
    torch.manual_seed(5)
    gate_up, down = torch.nn.Linear(16, 2 * 24, bias=bias).to(dtype), torch.nn.Linear(24, 16, bias=bias).to(dtype)
    h = torch.randn(45, 16).to(dtype)
    with torch.inference_mode():
        expected = down(gated_activation_reference(gate_up(h), "silu"))
        truth = F.linear(gated_activation_reference(F.linear(h.float(), gate_up.weight.float(), _f(gate_up.bias)), "silu"),
                         down.weight.float(), _f(down.bias))
        _as_close_as_the_reference(cpu_ops.gated_mlp(h, gate_up, down, "silu"), expected, truth)


def test_equal_length_runs():
    assert cpu_ops.equal_length_runs((3, 3, 5, 0, 5, 3, 1, 1)) == [(0, 3, 2), (6, 5, 2), (16, 3, 1), (19, 1, 2)]
    assert cpu_ops.equal_length_runs(()) == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention(dtype, causal):
    """Runs of equal lengths broken by other lengths, GQA; soft-cap and windows via the reference."""
    lengths = [3, 3, 5, 3, 1, 1, 7, 7]
    batch = pack([[1] * n for n in lengths])
    g = torch.Generator().manual_seed(4)
    total = sum(lengths)
    qkv = torch.randn(total, (4 + 2 * 2) * 8, generator=g).to(dtype)
    q, k, v = qkv[:, :32].view(total, 4, 8), qkv[:, 32:48].view(total, 2, 8), qkv[:, 48:].view(total, 2, 8)
    expected = varlen_attention_reference(q, k, v, batch.cu_seqlens, causal=causal)
    _same(cpu_ops.attention(q.clone(), k, v, batch, causal=causal), expected)
    for extra in (dict(softcap=5.0), dict(window=(1, 2))):
        expected = varlen_attention_reference(q, k, v, batch.cu_seqlens, causal=causal, **extra)
        _same(cpu_ops.attention(q.clone(), k, v, batch, causal=causal, **extra), expected)


def test_inference_only():
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="cpu backend is for inference"):
        cpu_ops.rms_norm(x, torch.ones(8), 1e-6, 0.0, torch.randn(4, 8))
    batch = pack([[1, 2, 3, 4]])
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="attention dropout needs backend='reference'"):
        cpu_ops.attention(q, q, q, batch, 0.1)


MODELS = {
    "llama": dict(),  # the suite's shared tiny checkpoint: GQA ratio 2
    "gemma": dict(hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=32),  # offset norm, tanh-GELU, scaled embedding
}


@pytest.fixture(scope="module", params=list(MODELS))
def engine_dir(request, tmp_path_factory):
    return convert(tiny(request.param, **MODELS[request.param]), tmp_path_factory.mktemp(request.param) / "e", quiet=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_cpu_backend_equals_reference(engine_dir, dtype):
    texts = sample_sentences(9, seed=7, min_words=1, max_words=12) + [("Find the passage", "a query")] * 2
    for pooling in ("mean", "last_token"):
        ref = Engine.from_pretrained(engine_dir, dtype=dtype, backend="reference", pooling=pooling)
        cpu = Engine.from_pretrained(engine_dir, dtype=dtype, backend="cpu", pooling=pooling)
        f32 = Engine.from_pretrained(engine_dir, dtype=torch.float32, backend="reference", pooling=pooling)
        truth = f32.encode(texts, batch_size=4)
        _as_close_as_the_reference(cpu.encode(texts, batch_size=4), ref.encode(texts, batch_size=4), truth)
        # embed_tokenized in input order: equal lengths need not be adjacent.
        items = ref.tokenize(texts)
        _as_close_as_the_reference(cpu.embed_tokenized(items), ref.embed_tokenized(items), f32.embed_tokenized(items))


def test_cpu_backend_needs_the_cpu(engine_dir):
    from engine.backends import get_ops

    with pytest.raises(ValueError, match="backend='cpu' runs on the CPU"):
        get_ops("cpu", torch.device("cuda"))
