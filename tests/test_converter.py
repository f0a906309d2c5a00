"""converters.hf2engine: converted weights equal an independent reference (transformers + peft's own
merge, fused here), for every family, bare checkpoints, several adapters, dtypes and pooling defaults;
the output is deterministic, records its sources and loads in the Engine; conversion streams."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import _checkpoints as ck
from converters.convert import convert
from engine.config import ModelConfig
from engine.format import ENGINE_CONFIG, WEIGHTS_INDEX, EngineConfig

FAMILY_KWARGS = {
    "llama": {},
    "mistral": {},
    "gemma": {"head_dim": 32},  # head_dim != hidden / heads
    "qwen2": {},
}


@pytest.fixture(scope="session", autouse=True)
def _checkpoint_root(tmp_path_factory):
    ck.set_root(tmp_path_factory.mktemp("converter-ckpts"))


def _hf_config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.mark.parametrize("family", sorted(FAMILY_KWARGS))
def test_family_with_lora_matches_peft_merge(family, tmp_path):
    src = ck.tiny(family, **FAMILY_KWARGS[family])
    lora = ck.adapter(src, seed=1)
    out = convert(src, tmp_path / "engine", loras=[lora], quiet=True)

    cfg = EngineConfig.read(out)
    assert cfg.model == ModelConfig.from_hf(_hf_config(src))
    assert (cfg.dtype, cfg.pooling, cfg.max_length, cfg.has_lm_head) == ("float32", "mean", 512, False)
    if family == "gemma":
        assert cfg.model.head_dim == 32 and cfg.model.q_size != cfg.model.hidden_size
    expected = ck.fuse_reference(ck.peft_merged_state(src, [lora]), cfg.model.num_layers, cfg.model.qkv_bias)
    # The adapter really changes the weights (the comparison is not vacuous).
    base = ck.fuse_reference(ck.peft_merged_state(src, []), cfg.model.num_layers, cfg.model.qkv_bias)
    assert (base["layers.0.qkv.weight"] - expected["layers.0.qkv.weight"]).abs().max() > 1e-3
    ck.assert_close_verbose(ck.engine_tensors(out), expected)


def test_two_adapters_merged_in_order_rslora_and_patterns(tmp_path):
    src = ck.tiny("llama")
    first = ck.adapter(src, r=4, alpha=16, use_rslora=True, seed=2)  # scale alpha / sqrt(r)
    second = ck.peft_adapter(  # alpha != 2r, and per-module rank / alpha patterns
        src, r=8, lora_alpha=5, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}, seed=3
    )
    out = convert(src, tmp_path / "engine", loras=[first, second], quiet=True)
    cfg = EngineConfig.read(out)
    expected = ck.fuse_reference(ck.peft_merged_state(src, [first, second]), cfg.model.num_layers, False)
    ck.assert_close_verbose(ck.engine_tensors(out), expected)
    adapters = cfg.sources["adapters"]
    assert [a["path"] for a in adapters] == [str(first.resolve()), str(second.resolve())]
    assert [(a["r"], a["lora_alpha"], a["use_rslora"]) for a in adapters] == [(4, 16, True), (8, 5, False)]


def test_bare_model_checkpoint_with_bare_adapter(tmp_path):
    # A bare *Model checkpoint (keys layers.N..., no lm_head) and an adapter saved the way LLM2Vec saves
    # them (from the bare model: base_model.model.layers.N...).
    src = ck.tiny("qwen2", bare_model=True, seed=4)
    assert "layers.0.self_attn.q_proj.bias" in json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    lora = ck.peft_adapter(src, bare=True, seed=5)
    with safe_open(str(lora / "adapter_model.safetensors"), framework="pt") as f:
        assert all(k.startswith("base_model.model.layers.") for k in f.keys())
    out = convert(src, tmp_path / "engine", loras=[lora], quiet=True)
    cfg = EngineConfig.read(out)
    assert cfg.model.qkv_bias
    expected = ck.fuse_reference(ck.peft_merged_state(src, [lora], bare=True), cfg.model.num_layers, True)
    ck.assert_close_verbose(ck.engine_tensors(out), expected)
    # A CausalLM-style adapter (base_model.model.model.layers...) applies to the bare checkpoint too;
    # reference: peft on the *ForCausalLM class, which loads the bare weights under "model.".
    causal_lora = ck.adapter(src, seed=6)
    out2 = convert(src, tmp_path / "engine2", loras=[causal_lora], quiet=True)
    expected2 = ck.fuse_reference(ck.peft_merged_state(src, [causal_lora]), cfg.model.num_layers, True)
    ck.assert_close_verbose(ck.engine_tensors(out2), expected2)


def test_keep_lm_head(tmp_path):
    src = ck.tiny("llama")
    out = convert(src, tmp_path / "kept", keep_lm_head=True, quiet=True)
    assert EngineConfig.read(out).has_lm_head
    state = ck.engine_tensors(out)
    with safe_open(str(src / _shard_of(src, "lm_head.weight")), framework="pt") as f:
        torch.testing.assert_close(state["lm_head.weight"], f.get_tensor("lm_head.weight"), rtol=0, atol=0)
    index = json.loads((out / WEIGHTS_INDEX).read_text())["weight_map"]
    last = f"weights-{EngineConfig.read(out).model.num_layers + 2:05d}.safetensors"
    assert index["lm_head.weight"] == index["norm"] == last
    dropped = convert(src, tmp_path / "dropped", quiet=True)
    assert "lm_head.weight" not in ck.engine_tensors(dropped)

    from engine import Engine

    engine = Engine.from_pretrained(out)
    assert engine.model.lm_head is not None

    # Tied embeddings (Gemma's default): there is no separate lm_head to keep.
    tied = ck.tiny("gemma", head_dim=32)
    assert EngineConfig.read(convert(tied, tmp_path / "tied", keep_lm_head=True, quiet=True)).model.tie_word_embeddings
    assert "lm_head.weight" not in ck.engine_tensors(tmp_path / "tied")


def _shard_of(src, name):
    return json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_llama31_rope_scaling_round_trips(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    src = ck.tiny("llama", rope_scaling=dict(scaling), seed=7)  # transformers adds rope_theta to the dict it gets
    out = convert(src, tmp_path / "engine", quiet=True)
    cfg = EngineConfig.read(out)
    assert cfg.model.rope_scaling == scaling
    assert cfg.model.rope_theta == 500000.0
    assert cfg.model == ModelConfig.from_hf(_hf_config(src))


def test_llm2vec_config_sets_pooling_defaults(tmp_path):
    src = ck.tiny("mistral")
    lora = ck.copy_tree(ck.adapter(src, seed=8), tmp_path / "adapter")
    (lora / "llm2vec_config.json").write_text(
        json.dumps({"pooling_mode": "eos_token", "max_length": 256, "skip_instruction": True})
    )
    cfg = EngineConfig.read(convert(src, tmp_path / "a", loras=[lora], quiet=True))
    assert (cfg.pooling, cfg.max_length) == ("last_token", 256)
    assert "llm2vec_config.json" in cfg.sources["adapters"][0]["files"]
    # Explicit options win.
    cfg = EngineConfig.read(convert(src, tmp_path / "b", loras=[lora], pooling="mean", max_length=128, quiet=True))
    assert (cfg.pooling, cfg.max_length) == ("mean", 128)
    # The last adapter with an llm2vec_config.json wins.
    second = ck.copy_tree(ck.adapter(src, seed=9), tmp_path / "adapter2")
    (second / "llm2vec_config.json").write_text(json.dumps({"pooling_mode": "weighted_mean"}))
    cfg = EngineConfig.read(convert(src, tmp_path / "c", loras=[lora, second], quiet=True))
    assert (cfg.pooling, cfg.max_length) == ("weighted_mean", 256)


def test_dtype_bfloat16_casts_once_after_merge(tmp_path):
    src = ck.tiny("llama")
    lora = ck.adapter(src, seed=1)
    bf16 = convert(src, tmp_path / "bf16", loras=[lora], dtype="bfloat16", quiet=True)
    fp32 = convert(src, tmp_path / "fp32", loras=[lora], dtype="float32", quiet=True)
    assert EngineConfig.read(bf16).dtype == "bfloat16"
    s16, s32 = ck.engine_tensors(bf16), ck.engine_tensors(fp32)
    assert {t.dtype for t in s16.values()} == {torch.bfloat16}
    for name in s32:  # merged in float32, rounded once: exactly the float32 result rounded
        assert torch.equal(s16[name], s32[name].to(torch.bfloat16)), name


def test_default_dtype_is_the_sources(tmp_path):
    src = ck.tiny("qwen2", dtype=torch.bfloat16, seed=10)
    out = convert(src, tmp_path / "engine", quiet=True)
    assert EngineConfig.read(out).dtype == "bfloat16"
    assert {t.dtype for t in ck.engine_tensors(out).values()} == {torch.bfloat16}
    cfg = EngineConfig.read(convert(src, tmp_path / "f16", dtype=torch.float16, quiet=True))
    assert cfg.dtype == "float16"


def test_layout_determinism_and_sources(tmp_path):
    src = ck.tiny("llama")
    lora = ck.adapter(src, seed=1)
    a = convert(src, tmp_path / "a", loras=[lora], quiet=True)
    b = convert(src, tmp_path / "b", loras=[lora], quiet=True)
    cfg = EngineConfig.read(a)
    n = cfg.model.num_layers

    # One shard per layer, the embeddings in their own, the final norm in the last.
    index = json.loads((a / WEIGHTS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"weights-{k:05d}.safetensors" for k in range(1, n + 3)]
    assert index["weight_map"]["embed.weight"] == shards[0]
    assert all(index["weight_map"][f"layers.{i}.qkv.weight"] == shards[i + 1] for i in range(n))
    assert index["weight_map"]["norm"] == shards[-1]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ck.engine_tensors(a).values())

    # Byte-identical weights and index.
    for name in [*shards, WEIGHTS_INDEX, ENGINE_CONFIG]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    # Sources: every input file with its sha256.
    ckpt = cfg.sources["checkpoint"]
    assert ckpt["path"] == str(src.resolve())
    expected_files = {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"}
    expected_files |= set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert set(ckpt["files"]) == expected_files
    for sources in [ckpt, *cfg.sources["adapters"]]:
        root = sources["path"]
        for name, digest in sources["files"].items():
            assert hashlib.sha256(open(f"{root}/{name}", "rb").read()).hexdigest() == digest, name
    assert set(cfg.sources["adapters"][0]["files"]) == {"adapter_config.json", "adapter_model.safetensors"}

    # Tokenizer files copied verbatim; no temp dirs left behind.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (src / name).read_bytes()
    assert ck.leftovers(tmp_path) == []


def test_engine_loads_and_encodes(tmp_path):
    from engine import Engine

    src = ck.tiny("qwen2")
    out = convert(src, tmp_path / "engine", loras=[ck.adapter(src, seed=1)], quiet=True)
    engine = Engine.from_pretrained(out)
    emb = engine.encode(["the quick brown fox", "a search engine"])
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()


def test_cli_success_with_progress_bar(tmp_path):
    src = ck.tiny("llama")
    lora = ck.adapter(src, seed=1)
    out = tmp_path / "nested" / "engine"
    proc = ck.run_cli(src, out, "--lora", lora, "--dtype", "float16", "--pooling", "bos_token", "--max-length", "64")
    assert proc.returncode == 0, proc.stderr
    assert "hf2engine" in proc.stderr and "shard" in proc.stderr  # the tqdm bar, on stderr
    assert proc.stdout == ""
    cfg = EngineConfig.read(out)
    assert (cfg.dtype, cfg.pooling, cfg.max_length) == ("float16", "bos_token", 64)
    quiet = ck.run_cli(src, tmp_path / "quiet", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_streaming_peak_memory_stays_near_one_layer(tmp_path):
    """Converting a ~210 MB model of 16 ~13 MB layers must not hold the model in memory."""
    layers, hidden, intermediate = 16, 512, 1536
    src = tmp_path / "big"
    model_bytes = ck.write_big_checkpoint(src, ck.tiny("llama"), layers=layers, hidden=hidden, intermediate=intermediate)
    layer_bytes = ck.nbytes_per_layer(hidden, intermediate)
    assert model_bytes > 12 * layer_bytes

    probe = (
        "import resource, sys\n"
        "import converters.convert as h, converters.lora, converters.sources\n"
        "if len(sys.argv) > 1:\n"
        "    h.convert(sys.argv[1], sys.argv[2], loras=sys.argv[3:], quiet=True)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"  # Linux: KiB
    )

    def peak(*args) -> int:
        proc = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True,
                              cwd=str(ck.REPO), timeout=120)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().splitlines()[-1])

    baseline = peak()
    used = peak(src, tmp_path / "out") - baseline
    assert (tmp_path / "out" / "weights-00018.safetensors").is_file()
    # Whole-model loading would need >= model_bytes; streaming needs a few layers' worth.
    assert used < model_bytes / 3, f"peak RSS grew by {used / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"


@pytest.mark.parametrize("umask, dirs, files", [(0o002, 0o775, 0o664), (0o027, 0o750, 0o640)])
def test_output_follows_the_umask(tmp_path, umask, dirs, files):
    import os
    import stat

    previous = os.umask(umask)
    try:
        out = convert(ck.tiny("llama"), tmp_path / "new" / "engine", quiet=True)
    finally:
        os.umask(previous)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 5
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {files}
    assert {stat.S_IMODE(p.stat().st_mode) for p in (out, out.parent)} == {dirs}
