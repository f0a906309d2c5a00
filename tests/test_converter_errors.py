"""converters.hf2engine on bad inputs: one clear line on stderr (no traceback), exit code 2, no OUT and
no temporary directory left behind, and an existing OUT untouched (unless --force and success)."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import _checkpoints as ck
from converters import hf2engine
from converters.hf2engine import ConversionError, convert, main
from engine.format import ENGINE_CONFIG, EngineConfig

SHARDS = "model.safetensors.index.json"


@pytest.fixture(scope="session", autouse=True)
def _checkpoint_root(tmp_path_factory):
    ck.set_root(tmp_path_factory.mktemp("converter-ckpts"))


@pytest.fixture
def src(tmp_path):
    """A private copy of a tiny Llama checkpoint that a test may damage."""
    return ck.copy_tree(ck.tiny("llama"), tmp_path / "src")


@pytest.fixture
def lora_copy(tmp_path):
    """A private copy of a valid adapter for the tiny Llama, whose config a test may edit."""
    return ck.copy_tree(ck.adapter(ck.tiny("llama"), seed=1), tmp_path / "lora")


def _shard_of(src, name):
    return src / json.loads((src / SHARDS).read_text())["weight_map"][name]


def _check_failure(rc, err, match, parent, out, before=None):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hf2engine: error: "), lines[0]
    assert match in lines[0], lines[0]
    assert ck.leftovers(parent) == []
    if before is None:
        assert not out.exists()
    else:
        assert ck.tree_snapshot(out) == before


def _fails(capsys, args, match, out):
    """main(args) fails cleanly with ``out`` absent, and again with ``out`` present plus --force
    (the existing directory must survive untouched)."""
    capsys.readouterr()  # drop what building the fixtures printed
    rc = main([*map(str, args), str(out), "--quiet"])
    _check_failure(rc, capsys.readouterr().err, match, out.parent, out)
    out.mkdir()
    (out / "keep.txt").write_text("existing")
    before = ck.tree_snapshot(out)
    rc = main([*map(str, args), str(out), "--quiet", "--force"])
    _check_failure(rc, capsys.readouterr().err, match, out.parent, out, before)
    shutil.rmtree(out)


def _malicious_pickle(marker) -> bytes:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps({"model.embed_tokens.weight": Payload()})


# --- through the CLI in a subprocess ----------------------------------------------------------------


def _cli_fails(args, match, out, before=None):
    proc = ck.run_cli(*args)
    assert proc.stdout == ""
    _check_failure(proc.returncode, proc.stderr, match, out.parent, out, before)


def test_cli_missing_src(tmp_path):
    out = tmp_path / "out"
    _cli_fails([tmp_path / "nope", out], "nope: no such directory", out)


def test_cli_unsupported_architecture(tmp_path, src):
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _cli_fails([src, out], "GPT2LMHeadModel", out)


def test_cli_truncated_shard(tmp_path, src):
    shard = _shard_of(src, "model.layers.1.mlp.down_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    _cli_fails([src, out], f"{shard}: truncated or corrupt", out)


def test_cli_pickle_only_checkpoint_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    # The payload really does run on unpickling (checked with a second marker).
    probe = tmp_path / "probe"
    pickle.loads(_malicious_pickle(probe))
    assert probe.exists()

    src = tmp_path / "src"
    src.mkdir()
    good = ck.tiny("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(good / name, src / name)
    (src / "pytorch_model.bin").write_bytes(_malicious_pickle(marker))
    out = tmp_path / "out"
    _cli_fails([src, out], "pytorch_model.bin", out)
    assert not marker.exists()
    rc = main([str(src), str(out), "--quiet"])
    assert rc == 2 and not marker.exists()


def test_cli_existing_out_needs_force(tmp_path):
    good = ck.tiny("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing")
    before = ck.tree_snapshot(out)
    _cli_fails([good, out], "already exists; pass --force", out, before)


# --- through main() ----------------------------------------------------------------------------------


def test_src_without_config(capsys, tmp_path, src):
    (src / "config.json").unlink()
    _fails(capsys, [src], "config.json: missing", tmp_path / "out")


def test_src_is_a_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _fails(capsys, [f], "not a directory", tmp_path / "out")


def test_src_without_tokenizer_json(capsys, tmp_path, src):
    (src / "tokenizer.json").unlink()
    _fails(capsys, [src], "no tokenizer.json", tmp_path / "out")


def test_corrupt_shard_header(capsys, tmp_path, src):
    shard = _shard_of(src, "model.layers.0.self_attn.q_proj.weight")
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    _fails(capsys, [src], f"{shard}: truncated or corrupt", tmp_path / "out")


def test_header_offsets_beyond_file(capsys, tmp_path, src):
    # A well-formed header whose last tensor claims bytes the file does not have.
    shard = _shard_of(src, "model.layers.0.self_attn.q_proj.weight")
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[name]["shape"][0] *= 2
    header[name]["data_offsets"][1] += header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    _fails(capsys, [src], "truncated or corrupt", tmp_path / "out")


def test_missing_tensor(capsys, tmp_path, src):
    name = "model.layers.1.mlp.up_proj.weight"
    ck.rewrite_without(_shard_of(src, name), name)
    _fails(capsys, [src], f"missing tensor {name!r}", tmp_path / "out")


def test_shape_mismatch(capsys, tmp_path, src):
    name = "model.layers.0.self_attn.k_proj.weight"
    shard = _shard_of(src, name)
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = torch.zeros(48, 64)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _fails(capsys, [src], f"shape mismatch for {name!r}: [48, 64] in the checkpoint, [32, 64]", tmp_path / "out")


def test_unexpected_layer_tensor(capsys, tmp_path, src):
    shard = _shard_of(src, "model.layers.0.self_attn.o_proj.weight")
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _fails(capsys, [src], "unexpected layer tensor 'model.layers.0.self_attn.o_proj.bias'", tmp_path / "out")


def test_adapter_for_a_different_size_model(capsys, tmp_path):
    src = ck.tiny("llama")
    other = ck.tiny("llama", hidden_size=32, intermediate_size=64, seed=11)
    lora = ck.adapter(other, seed=1)
    _fails(capsys, [src, "--lora", lora], "adapter made for another model", tmp_path / "out")


def test_adapter_for_a_deeper_model(capsys, tmp_path):
    src = ck.tiny("llama")
    deeper = ck.tiny("llama", num_layers=3, seed=12)
    lora = ck.adapter(deeper, seed=1)
    _fails(capsys, [src, "--lora", lora], "names layer 2 but the model has 2 layers", tmp_path / "out")


def test_dora_adapter_refused_by_name(capsys, tmp_path):
    src = ck.tiny("llama")
    lora = ck.peft_adapter(src, use_dora=True, seed=13)
    _fails(capsys, [src, "--lora", lora], "DoRA (use_dora=true) is not supported", tmp_path / "out")


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_embedding_and_lm_head_lora_refused(capsys, tmp_path, target):
    src = ck.tiny("llama")
    lora = ck.peft_adapter(src, target_modules=["q_proj", target], seed=14)
    _fails(capsys, [src, "--lora", lora], f"LoRA on {target}", tmp_path / "out")


def test_lm_head_lora_found_by_key_with_regex_targets(capsys, tmp_path):
    # target_modules as a regex string: the config does not list names, the tensor keys give it away.
    src = ck.tiny("llama")
    lora = ck.peft_adapter(src, target_modules=r".*(q_proj|lm_head)", seed=15)
    _fails(capsys, [src, "--lora", lora], "LoRA on lm_head is not supported", tmp_path / "out")


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"modules_to_save": ["score"]}, "modules_to_save"),
        ({"bias": "all"}, "LoRA bias (bias='all')"),
        ({"lora_bias": True}, "LoRA bias (lora_bias=true)"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"target_modules": ["q_proj", "rotary_emb"]}, "target modules ['rotary_emb'] are not supported"),
        ({"r": 16}, "has rank 4 but adapter_config.json says r=16"),
    ],
)
def test_adapter_config_features_refused_by_name(capsys, tmp_path, lora_copy, edit, match):
    config = json.loads((lora_copy / "adapter_config.json").read_text())
    config.update(edit)
    (lora_copy / "adapter_config.json").write_text(json.dumps(config))
    _fails(capsys, [ck.tiny("llama"), "--lora", lora_copy], match, tmp_path / "out")


def test_adapter_with_pickled_weights_only(capsys, tmp_path, lora_copy):
    marker = tmp_path / "pwned"
    (lora_copy / "adapter_model.safetensors").unlink()
    (lora_copy / "adapter_model.bin").write_bytes(_malicious_pickle(marker))
    _fails(capsys, [ck.tiny("llama"), "--lora", lora_copy], "adapter_model.bin", tmp_path / "out")
    assert not marker.exists()


def test_missing_adapter_dir(capsys, tmp_path):
    _fails(capsys, [ck.tiny("llama"), "--lora", tmp_path / "nope"], "no such adapter directory", tmp_path / "out")


def test_keep_lm_head_on_bare_checkpoint(capsys, tmp_path):
    bare = ck.tiny("qwen2", bare_model=True, seed=4)
    _fails(capsys, [bare, "--keep-lm-head"], "missing tensor 'lm_head.weight'", tmp_path / "out")


def test_out_may_not_replace_its_input(capsys, tmp_path, src):
    capsys.readouterr()
    before = ck.tree_snapshot(src)
    rc = main([str(src), str(src), "--force", "--quiet"])
    _check_failure(rc, capsys.readouterr().err, "would replace the input", tmp_path, src, before)


def test_failure_while_writing_cleans_up(monkeypatch, tmp_path):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", path)
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf2engine, "save_file", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        convert(ck.tiny("llama"), out, quiet=True)
    assert not out.exists() and ck.leftovers(tmp_path) == []
    out.mkdir()
    (out / "keep.txt").write_text("existing")
    before = ck.tree_snapshot(out)
    calls.clear()
    with pytest.raises(OSError):
        convert(ck.tiny("llama"), out, quiet=True, force=True)
    assert ck.tree_snapshot(out) == before and ck.leftovers(tmp_path) == []


def test_force_replaces_existing_out(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    good = ck.tiny("llama")
    capsys.readouterr()
    assert main([str(good), str(out), "--force", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert not (out / "stale.txt").exists() and (out / ENGINE_CONFIG).is_file()
    assert EngineConfig.read(out).model.family == "llama"
    assert ck.leftovers(tmp_path) == []


def test_convert_raises_conversion_error(tmp_path):
    with pytest.raises(ConversionError, match="no such directory"):
        convert(tmp_path / "nope", tmp_path / "out")
    assert issubclass(ConversionError, ValueError)
    with pytest.raises(ConversionError, match="dtype"):
        convert(ck.tiny("llama"), tmp_path / "out", dtype="float64")
    with pytest.raises(ConversionError, match="pooling"):
        convert(ck.tiny("llama"), tmp_path / "out", pooling="cls")
    with pytest.raises(ConversionError, match="max_length"):
        convert(ck.tiny("llama"), tmp_path / "out", max_length=0)
    assert not (tmp_path / "out").exists()
