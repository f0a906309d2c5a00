"""The newer families and modes against transformers' own model classes, in float32 within 1e-4.

Gemma-2 (soft-capped attention and logits, query_pre_attn_scalar, four norms per layer, a sliding
window shorter than the inputs), Qwen3 (q/k norms), Mistral with head_dim independent of hidden /
heads (Mistral-NeMo) and with a sliding window, Llama-3.2 (tied embeddings, llama3 rope scaling),
each bidirectional with a LoRA adapter (LLM2Vec style: peft loads it unmerged into the reference) and
causal (e5-mistral, Qwen3-Embedding style: transformers' default mask). ``--append-eos`` follows
e5-mistral's recipe. The reference is in tests/_hf_reference.py and shares no code with the engine.
"""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import _checkpoints as ck
from _hf_reference import hf_embeddings

from converters.convert import convert
from converters.tiny_models import FAMILY_VARIANTS, sample_sentences
from engine import Engine
from engine.batch import pack
from engine.config import ModelConfig
from engine.format import EngineConfig

VARIANTS = dict(FAMILY_VARIANTS)
# e5-mistral runs causal with Mistral's sliding window (4096 there, 5 here so that it matters).
VARIANTS["mistral_window"] = ("mistral", dict(head_dim=32, extra_config=dict(sliding_window=5)))
CASES = [
    ("gemma2", "bidirectional"), ("gemma2", "causal"),
    ("qwen3", "bidirectional"), ("qwen3", "causal"),
    ("mistral_nemo", "bidirectional"), ("mistral_nemo", "causal"), ("mistral_window", "causal"),
    ("llama32", "bidirectional"), ("llama32", "causal"),
]
INPUTS = [
    "the quick brown fox jumps over the lazy dog",
    ("Retrieve a passage that answers the question", "what is attention in a language model?"),
    "river",
    " ".join(["mountain city music history science"] * 8),  # longer than MAX_LENGTH: truncated
    ("Given a query, retrieve documents", "bank loan interest rate today"),
]
MAX_LENGTH = 24
_SOURCES: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def _root(tmp_path_factory):
    ck.set_root(tmp_path_factory.mktemp("family-ckpts"))


def source(name: str):
    """(checkpoint dir, its LoRA adapter dir), built once per variant."""
    if name not in _SOURCES:
        family, kwargs = VARIANTS[name]
        src = ck.tiny(family, seed=len(name), **kwargs)
        _SOURCES[name] = (src, ck.adapter(src, seed=3))
    return _SOURCES[name]


def window_of(src) -> int | None:
    raw = json.loads((src / "config.json").read_text())
    return raw["sliding_window"] if "sliding_attention" in (raw.get("layer_types") or []) else None


def reference_decoder(src, adapter=None):
    """The bare transformers decoder, with the adapter loaded unmerged by peft."""
    if adapter is None:
        return AutoModel.from_pretrained(str(src), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).eval().get_base_model().model


def assert_rel_close(actual, expected, tol=1e-4):
    err = (actual.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert err.max() <= tol, f"max relative error {err.max():.3e} > {tol:.0e}: {err.tolist()}"


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{m}" for n, m in CASES])
def case(request, tmp_path_factory):
    """(engine dir, reference decoder, tokenizer, attention, sliding window) for one family and mode."""
    name, attention = request.param
    src, adapter = source(name)
    lora = adapter if attention == "bidirectional" else None
    out = convert(src, tmp_path_factory.mktemp(f"{name}-{attention}") / "engine", loras=[lora] if lora else [],
                  attention=attention, quiet=True)
    return out, reference_decoder(src, lora), AutoTokenizer.from_pretrained(str(src)), attention, window_of(src)


@pytest.mark.parametrize("pooling", ["mean", "last_token", "weighted_mean"])
def test_encode_matches_transformers(case, pooling):
    out, decoder, tokenizer, attention, window = case
    engine = Engine.from_pretrained(out, dtype=torch.float32, pooling=pooling, max_length=MAX_LENGTH)
    assert engine.config.model.attention == attention
    actual = engine.encode(INPUTS, batch_size=2)
    causal = attention == "causal"
    expected = hf_embeddings(decoder, tokenizer, INPUTS, pooling, MAX_LENGTH, causal=causal,
                             sliding_window=None if causal else window)
    assert_rel_close(actual, expected)


def test_bidirectional_window_is_transformers_own_and_matters():
    """Gemma-2's sliding layers, bidirectional: the explicit masks of the reference are what
    transformers builds itself for ``is_causal=False`` (|q - k| <= window), and the window changes
    the embeddings of inputs longer than it (so the parity above is not vacuous)."""
    src, _ = source("gemma2")
    assert window_of(src) == 4
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    decoder = reference_decoder(src)
    ours = hf_embeddings(decoder, tokenizer, INPUTS, "mean", MAX_LENGTH, sliding_window=4)
    decoder.config.is_causal = False  # transformers' own bidirectional (sliding) masks from the 2-D mask
    texts = [t if isinstance(t, str) else f"{t[0].strip()} {t[1]}" for t in INPUTS]
    enc = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt",
                    return_offsets_mapping=True)
    with torch.no_grad():
        hidden = decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.double()
    own = torch.stack([hidden[b, 1 : int(enc["attention_mask"][b].sum())].mean(0) for b in range(len(texts))])
    text_only = [b for b, t in enumerate(INPUTS) if isinstance(t, str)]  # pairs pool part of the sequence
    assert_rel_close(ours[text_only], own[text_only], 1e-6)
    decoder.config.is_causal = True
    unwindowed = hf_embeddings(decoder, tokenizer, INPUTS, "mean", MAX_LENGTH)
    long_rows = [0, 3]
    diff = (unwindowed[long_rows] - ours[long_rows]).norm(dim=-1) / ours[long_rows].norm(dim=-1)
    assert diff.min() > 1e-2, diff


def fused_reference(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Engine tensor names from a transformers state dict, written here from the families' layouts."""
    p = "model." if "model.embed_tokens.weight" in state else ""
    out = {"embed.weight": state[f"{p}embed_tokens.weight"], "norm": state[f"{p}norm.weight"]}
    for i in range(cfg.num_layers):
        L, n = f"{p}layers.{i}.", f"layers.{i}."
        out[n + "attn_norm"] = state[L + "input_layernorm.weight"]
        if cfg.family == "gemma2":  # norms around attention and MLP outputs, plus the MLP's input norm
            out[n + "post_attn_norm"] = state[L + "post_attention_layernorm.weight"]
            out[n + "mlp_norm"] = state[L + "pre_feedforward_layernorm.weight"]
            out[n + "post_mlp_norm"] = state[L + "post_feedforward_layernorm.weight"]
        else:
            out[n + "mlp_norm"] = state[L + "post_attention_layernorm.weight"]
        if cfg.family == "qwen3":
            out[n + "q_norm"] = state[L + "self_attn.q_norm.weight"]
            out[n + "k_norm"] = state[L + "self_attn.k_norm.weight"]
        out[n + "qkv.weight"] = torch.cat([state[L + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[n + "o.weight"] = state[L + "self_attn.o_proj.weight"]
        out[n + "gate_up.weight"] = torch.cat([state[L + "mlp.gate_proj.weight"], state[L + "mlp.up_proj.weight"]])
        out[n + "down.weight"] = state[L + "mlp.down_proj.weight"]
    return out


@pytest.mark.parametrize("name", ["gemma2", "qwen3", "mistral_nemo", "llama32"])
def test_converted_tensors_equal_peft_merge(name, tmp_path):
    src, adapter = source(name)
    out = convert(src, tmp_path / "engine", loras=[adapter], quiet=True)
    cfg = EngineConfig.read(out).model
    assert cfg == ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    expected = fused_reference(ck.peft_merged_state(src, [adapter]), cfg)
    ck.assert_close_verbose(ck.engine_tensors(out), expected)


def test_config_fields_of_each_family():
    read = {name: ModelConfig.from_hf(json.loads((source(name)[0] / "config.json").read_text())) for name in VARIANTS}
    g = read["gemma2"]
    assert (g.attn_logit_softcap, g.final_logit_softcap, g.query_pre_attn_scalar) == (1.5, 3.0, 24.0)
    assert g.post_norms and g.attention_scale == 24 ** -0.5 and g.norm_weight_offset == 1.0
    assert (g.sliding_window, g.sliding_layers, g.layer_window(0), g.layer_window(1)) == (4, (0,), (4, 4), None)
    assert g.tie_word_embeddings and g.head_dim == 32 and g.q_size == 128 != g.hidden_size
    q = read["qwen3"]
    assert q.qk_norm and not q.qkv_bias and not q.post_norms and q.head_dim == 32
    n = read["mistral_nemo"]
    assert (n.head_dim, n.q_size, n.hidden_size, n.sliding_window) == (32, 128, 64, None)
    ll = read["llama32"]
    assert ll.tie_word_embeddings and ll.rope_scaling["rope_type"] == "llama3" and ll.rope_scaling["factor"] == 32.0
    raw = json.loads((source("mistral_window")[0] / "config.json").read_text())
    assert ModelConfig.from_hf(raw).sliding_window is None  # bidirectional (LLM2Vec) ignores it
    causal = ModelConfig.from_hf(raw, attention="causal")
    assert causal.sliding_layers == (0, 1) and causal.layer_window(1) == (4, 0)


@pytest.mark.parametrize("name, attention", [("gemma2", "bidirectional"), ("qwen3", "causal")])
def test_batch_invariance(name, attention, tmp_path):
    src, _ = source(name)
    engine = Engine.from_pretrained(convert(src, tmp_path / "e", attention=attention, quiet=True), max_length=MAX_LENGTH)
    inputs = sample_sentences(7, seed=4, min_words=1, max_words=14) + INPUTS
    together = engine.encode(inputs, batch_size=64)
    alone = torch.cat([engine.encode([item]) for item in inputs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(engine.encode(inputs, batch_size=3), alone, rtol=1e-5, atol=1e-6)


def test_gemma2_soft_capped_logits_match_transformers(tmp_path):
    """MNTP reads the LM head: Gemma-2's tied, final-soft-capped logits, causal."""
    src, _ = source("gemma2")
    engine = Engine.from_pretrained(convert(src, tmp_path / "e", attention="causal", keep_lm_head=True, quiet=True))
    ids = engine.tokenize(["the quick brown fox jumps over the lazy dog and the river"])[0].input_ids
    with torch.no_grad():
        ours = engine.model.logits(engine.model(pack([ids])))
        theirs = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()(
            input_ids=torch.tensor([ids])).logits[0]
    assert theirs.abs().max() < 3.0  # the cap (3.0) bounds them
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_append_eos_follows_e5_mistral(tmp_path):
    """Truncate to max_length - 1, append EOS, pool it with last_token (causal Mistral)."""
    src, _ = source("mistral_nemo")
    out = convert(src, tmp_path / "e", attention="causal", pooling="last_token", append_eos=True, quiet=True)
    engine = Engine.from_pretrained(out, max_length=MAX_LENGTH)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    items = engine.tokenize(INPUTS)
    assert all(t.input_ids[-1] == tokenizer.eos_token_id for t in items)
    assert all(t.input_ids.count(tokenizer.eos_token_id) == 1 for t in items)
    assert items[3].num_tokens == MAX_LENGTH  # the long input: max_length - 1 tokens, then EOS
    expected = hf_embeddings(reference_decoder(src), tokenizer, INPUTS, "last_token", MAX_LENGTH, causal=True,
                             append_eos=True)
    assert_rel_close(engine.encode(INPUTS), expected)
    plain = Engine.from_pretrained(convert(src, tmp_path / "p", attention="causal", pooling="last_token", quiet=True),
                                   max_length=MAX_LENGTH)
    assert all(t.input_ids[-1] != tokenizer.eos_token_id for t in plain.tokenize(INPUTS))  # nothing appended


@pytest.mark.parametrize("name, attention", [("qwen3", "bidirectional"), ("qwen3", "causal"), ("gemma2", "bidirectional")])
def test_triton_backend_matches_reference(name, attention, tmp_path):
    """The whole engine through the Triton kernels (the interpreter without a GPU): the fused q/k norm
    + rotary, bidirectional and causal; soft-capped attention with a sliding window, four norms."""
    src, _ = source(name)
    out = convert(src, tmp_path / "e", attention=attention, quiet=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = [INPUTS[0], INPUTS[2], ("Find the claim", "kernel memory is fast")]
    pooling = "last_token" if attention == "causal" else "mean"
    ref, fast = (Engine.from_pretrained(out, device=device, dtype=torch.float32, backend=backend, pooling=pooling,
                                        max_length=16) for backend in ("reference", "triton"))
    assert fast.model.ops.name == "triton"
    torch.testing.assert_close(fast.encode(inputs), ref.encode(inputs), rtol=1e-4, atol=1e-5)
