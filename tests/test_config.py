"""ModelConfig read from Hugging Face config.json layouts of each family (4.x and 5.x styles)."""
import math

import pytest
import transformers

from engine.config import ConfigError, ModelConfig

LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def hf_dict(cls_name, arch, **kwargs):
    cfg = getattr(transformers, cls_name)(**{**SMALL, **kwargs}).to_dict()
    cfg["architectures"] = [arch]
    return cfg


def test_llama_fields():
    cfg = ModelConfig.from_hf(hf_dict("LlamaConfig", "LlamaForCausalLM"))
    assert (cfg.family, cfg.num_kv_heads, cfg.head_dim, cfg.activation) == ("llama", 2, 16, "silu")
    assert (cfg.norm_weight_offset, cfg.embedding_scale, cfg.qkv_bias, cfg.rope_scaling) == (0.0, 1.0, False, None)


def test_gemma_fields():
    cfg = ModelConfig.from_hf(hf_dict("GemmaConfig", "GemmaModel", head_dim=32))
    assert cfg.family == "gemma" and cfg.head_dim == 32 and cfg.q_size == 128
    assert cfg.norm_weight_offset == 1.0 and cfg.embedding_scale == math.sqrt(64)
    assert cfg.activation == "gelu_tanh" and cfg.tie_word_embeddings


def test_gemma_legacy_gelu_means_tanh_gelu():
    raw = hf_dict("GemmaConfig", "GemmaForCausalLM")
    raw["hidden_act"] = "gelu"
    assert ModelConfig.from_hf(raw).activation == "gelu_tanh"


def test_qwen2_has_qkv_bias_and_mistral_ignores_sliding_window():
    assert ModelConfig.from_hf(hf_dict("Qwen2Config", "Qwen2ForCausalLM")).qkv_bias
    mistral = ModelConfig.from_hf(hf_dict("MistralConfig", "MistralForCausalLM", sliding_window=8))
    assert mistral.family == "mistral" and not mistral.qkv_bias


def test_llama31_rope_scaling_from_both_layouts():
    v5 = hf_dict("LlamaConfig", "LlamaForCausalLM", rope_scaling=dict(LLAMA31_SCALING), rope_theta=500000.0,
                 max_position_embeddings=131072)
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling=dict(LLAMA31_SCALING))
    for raw in (v5, v4):
        cfg = ModelConfig.from_hf(raw)
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA31_SCALING


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "Gemma3ForCausalLM", "Phi3ForCausalLM"])
def test_other_architectures_are_refused_by_name(arch):
    raw = hf_dict("LlamaConfig", arch)
    with pytest.raises(ConfigError, match=arch):
        ModelConfig.from_hf(raw)


def test_unsupported_rope_scaling_is_refused():
    raw = hf_dict("LlamaConfig", "LlamaForCausalLM")
    raw.pop("rope_parameters", None)
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_hf(raw)


def test_missing_field_is_named():
    raw = hf_dict("LlamaConfig", "LlamaForCausalLM")
    del raw["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf(raw)


def test_round_trip_through_dict():
    cfg = ModelConfig.from_hf(hf_dict("LlamaConfig", "LlamaForCausalLM", rope_scaling=dict(LLAMA31_SCALING),
                                      max_position_embeddings=131072))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
