"""converters.hf2engine on bad inputs: one clear line on stderr (no traceback), exit code 2, no OUT and
no temporary directory left behind, and an existing OUT untouched (unless --force and success)."""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import _checkpoints as ck
from converters import convert as convert_module, safety
from converters.convert import ConversionError, convert
from converters.hf2engine import main
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


# --- the command line: one real subprocess, then main() with the same checks -------------------------


def test_cli_missing_src_in_a_subprocess(tmp_path):
    """The installed command itself: one line on stderr, nothing on stdout, exit 2 (each further
    subprocess would cost seconds of torch import; the cases below run the same main())."""
    out = tmp_path / "out"
    proc = ck.run_cli(tmp_path / "nope", out)
    assert proc.stdout == ""
    _check_failure(proc.returncode, proc.stderr, "nope: no such directory", out.parent, out)


def _cli_fails(capsys, args, match, out, before=None):
    capsys.readouterr()  # drop what building the fixtures printed
    rc = main([*map(str, args), "--quiet"])
    captured = capsys.readouterr()
    assert captured.out == ""
    _check_failure(rc, captured.err, match, out.parent, out, before)


def test_cli_unsupported_architecture(capsys, tmp_path, src):
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _cli_fails(capsys, [src, out], "GPT2LMHeadModel", out)


def test_cli_truncated_shard(capsys, tmp_path, src):
    shard = _shard_of(src, "model.layers.1.mlp.down_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    _cli_fails(capsys, [src, out], f"{shard}: truncated or corrupt", out)


def test_cli_pickle_only_checkpoint_refused_and_never_unpickled(capsys, tmp_path):
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
    _cli_fails(capsys, [src, out], "pytorch_model.bin", out)
    assert not marker.exists()


def test_cli_existing_out_needs_force(capsys, tmp_path):
    good = ck.tiny("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing")
    before = ck.tree_snapshot(out)
    _cli_fails(capsys, [good, out], "already exists; pass --force", out, before)


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
        # Nonsensical numbers and wrong shapes, named by field (a traceback or a silent merge before).
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": "4"}, "r must be a positive integer, got '4'"),
        ({"lora_alpha": math.nan}, "lora_alpha must be a finite number, got nan"),
        ({"lora_alpha": math.inf}, "lora_alpha must be a finite number, got inf"),
        ({"lora_alpha": "8"}, "lora_alpha must be a finite number"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"rank_pattern": ["down_proj"]}, "rank_pattern must be a JSON object"),
        ({"rank_pattern": {"down_(proj": 2}}, "rank_pattern: 'down_(proj' is not a valid regular expression"),
        ({"rank_pattern": {"down_proj": 0}}, "rank_pattern['down_proj'] must be a positive integer"),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern['q_proj'] must be a finite number"),
        ({"target_modules": 5}, "target_modules must be a list of module names or a regular expression"),
        ({"target_modules": [1, "q_proj"]}, "target_modules must be a list"),
        ({"target_modules": "(q_proj"}, "target_modules: '(q_proj' is not a valid regular expression"),
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


def _disk_full_on_call(n, real):
    """A writer that fails from its ``n``-th call on as a full disk does (with the error each library raises)."""
    calls = []

    def write(*args, **kwargs):
        calls.append(args)
        if len(calls) >= n:
            if real is save_file:  # safetensors wraps the OS error in its own exception
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))
        return real(*args, **kwargs)

    return write


@pytest.mark.parametrize("where", ["shard", "tokenizer copy"])
def test_disk_full_is_one_line_and_leaves_nothing(monkeypatch, capsys, tmp_path, where):
    if where == "shard":
        monkeypatch.setattr(convert_module, "save_file", _disk_full_on_call(3, save_file))
    else:
        monkeypatch.setattr(convert_module.shutil, "copyfile", _disk_full_on_call(1, shutil.copyfile))
    _fails(capsys, [ck.tiny("llama")], "no space left on device writing", tmp_path / "out")


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



# --- --force never replaces an input, however OUT is spelled -------------------------------------------


@pytest.mark.parametrize("spelling", ["x/../SRC", "SRC/../SRC", "relative SRC", "parent of SRC", "symlinked parent",
                                      "adapter via ..", "parent of the adapter"])
def test_force_never_replaces_an_input(capsys, tmp_path, monkeypatch, spelling):
    models, adapters = tmp_path / "models", tmp_path / "adapters"
    models.mkdir()
    adapters.mkdir()
    src = ck.copy_tree(ck.tiny("llama"), models / "src")
    lora = ck.copy_tree(ck.adapter(ck.tiny("llama"), seed=1), adapters / "lora")
    (models / "x").mkdir()
    (tmp_path / "link").symlink_to(models)
    monkeypatch.chdir(models)
    out = {
        "x/../SRC": models / "x" / ".." / "src",
        "SRC/../SRC": src / ".." / "src",
        "relative SRC": "./x/../src",
        "parent of SRC": models,
        "symlinked parent": tmp_path / "link" / "src",
        "adapter via ..": adapters / "lora" / ".." / "lora",
        "parent of the adapter": tmp_path / "adapters",
    }[spelling]
    before = {p: ck.tree_snapshot(p) for p in (src, lora)}
    capsys.readouterr()
    rc = main([str(src), str(out), "--lora", str(lora), "--force", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "OUT would replace the input" in err, err
    assert {p: ck.tree_snapshot(p) for p in (src, lora)} == before
    assert ck.leftovers(models) == [] and ck.leftovers(adapters) == []


# --- signals and a killed conversion -------------------------------------------------------------------


def _tmp_with_a_shard(parent):
    """A conversion's temporary directory once it holds its first weight shard (all the layers are
    still to come), else None."""
    for d in parent.glob(".out.tmp-*"):
        if (d / "weights-00001.safetensors").is_file():
            return d
    return None


def test_signals_clean_up_and_a_sigkill_leftover_is_swept(capsys, tmp_path):
    """A real conversion per signal, signalled once it has written a shard: SIGTERM, SIGHUP and SIGQUIT
    end like Ctrl-C (one line, 128 + signal, nothing left, an existing OUT untouched); SIGKILL leaves
    its marked temporary directory, which the next conversion to that OUT removes, and only it."""
    src = ck.big()
    env = {**os.environ, "PYTHONPATH": str(ck.REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGKILL):
        out = tmp_path / sig.name / "out"
        out.parent.mkdir()
        args = [sys.executable, "-m", "converters.hf2engine", str(src), str(out), "--quiet"]
        if sig == signal.SIGTERM:  # replacing an existing OUT: it must survive the interruption
            out.mkdir()
            (out / "keep.txt").write_text("existing")
            args.append("--force")
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ck.REPO), env=env)
        runs[sig] = [out, proc, False]
    try:
        deadline = time.monotonic() + 120
        while not all(sent for _, _, sent in runs.values()) and time.monotonic() < deadline:
            for sig, run in runs.items():
                out, proc, sent = run
                found = None if sent else _tmp_with_a_shard(out.parent)
                if found is not None:
                    assert proc.poll() is None, f"{sig.name}: finished before the signal"
                    os.kill(proc.pid, sig)
                    run[2] = sorted(p.name for p in found.iterdir())
                assert proc.poll() is None or run[2], f"{sig.name}: finished before the signal: {proc.stderr.read()}"
            time.sleep(0.005)
        results = {sig: proc.communicate(timeout=60) + (proc.returncode,) for sig, (_, proc, _) in runs.items()}
    finally:
        for _, proc, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        out = runs[sig][0]
        stdout, stderr, code = results[sig]
        assert code == 128 + sig, (sig.name, code, stderr, runs[sig][2])
        assert stderr.strip() == f"hf2engine: interrupted by {sig.name}; nothing written", stderr
        assert ck.leftovers(out.parent) == []
        if sig == signal.SIGTERM:
            assert ck.tree_snapshot(out) == {"keep.txt": b"existing"}
        else:
            assert not out.exists()

    out = runs[signal.SIGKILL][0]
    assert results[signal.SIGKILL][2] == -signal.SIGKILL
    (killed,) = ck.leftovers(out.parent)
    assert (out.parent / killed / safety.MARKER).is_file()
    # Look-alikes that are not provably a dead conversion's: no marker, and a live owner (this process).
    unmarked = out.parent / ".out.tmp-0123abcd"
    unmarked.mkdir()
    (unmarked / "mine.txt").write_text("user data")
    alive = out.parent / ".out.tmp-89abcdef"
    alive.mkdir()
    safety.write_marker(alive, "tmp")
    capsys.readouterr()
    assert main([str(ck.tiny("llama")), str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert EngineConfig.read(out).model.num_layers == 2
    assert ck.leftovers(out.parent) == sorted([unmarked.name, alive.name])
    assert (unmarked / "mine.txt").read_text() == "user data"


# --- silently wrong numbers ------------------------------------------------------------------------------


def _set_value(file, name, value, index=(0, 0)):
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors[name][index] = value
    save_file(tensors, str(file), metadata=meta)


@pytest.mark.parametrize("name, value", [("model.layers.1.mlp.down_proj.weight", math.nan),
                                         ("model.embed_tokens.weight", math.inf),
                                         ("model.norm.weight", -math.inf)])
def test_non_finite_weight_refused_naming_tensor_and_file(capsys, tmp_path, src, name, value):
    shard = _shard_of(src, name)
    _set_value(shard, name, value, (0,) if name.endswith("norm.weight") else (0, 0))
    _fails(capsys, [src], f"{shard}: tensor {name!r} holds NaN or Inf values", tmp_path / "out")


def test_non_finite_adapter_tensor_refused_naming_tensor_and_file(capsys, tmp_path, lora_copy):
    file = lora_copy / "adapter_model.safetensors"
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _set_value(file, name, math.nan)
    _fails(capsys, [ck.tiny("llama"), "--lora", lora_copy], f"{file}: tensor {name!r} holds NaN or Inf values",
           tmp_path / "out")


def test_weight_beyond_the_output_dtype_refused(capsys, tmp_path, src):
    name = "model.layers.0.self_attn.o_proj.weight"
    _set_value(_shard_of(src, name), name, 1e5)  # finite in float32, inf in float16
    _fails(capsys, [src, "--dtype", "float16"], f"tensor {name!r} has values beyond the range of float16",
           tmp_path / "out")


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"rms_norm_eps": 0}, "field 'rms_norm_eps': expected a positive number, got 0"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "field 'rope_theta': expected a positive number"),
        ({"rope_parameters": None, "rope_theta": math.nan}, "field 'rope_theta': expected a positive number, got nan"),
        ({"hidden_size": "64"}, "field 'hidden_size': expected a positive integer, got '64'"),
        ({"vocab_size": -5}, "field 'vocab_size': expected a positive integer"),
        ({"tie_word_embeddings": "no"}, "field 'tie_word_embeddings': expected true or false"),
        ({"architectures": "LlamaForCausalLM"}, "field 'architectures': expected a list of class names"),
        ({"num_hidden_layers": 10**9}, "beyond any supported model"),
        ({"num_hidden_layers": 4000}, "num_hidden_layers=4000 but the weights hold 2 layers"),
    ],
)
def test_nonsensical_config_json_is_one_line(capsys, tmp_path, src, edit, match):
    config = json.loads((src / "config.json").read_text())
    config.update(edit)
    (src / "config.json").write_text(json.dumps(config))
    _fails(capsys, [src], match, tmp_path / "out")


@pytest.mark.parametrize("entry", [5, ["model-00001.safetensors"], None])
def test_shard_index_entry_that_is_not_a_string(capsys, tmp_path, src, entry):
    index = json.loads((src / SHARDS).read_text())
    index["weight_map"]["model.norm.weight"] = entry
    (src / SHARDS).write_text(json.dumps(index))
    _fails(capsys, [src], f"weight_map['model.norm.weight']: invalid shard name {entry!r}", tmp_path / "out")


def test_tokenizer_that_does_not_parse(capsys, tmp_path, src):
    text = (src / "tokenizer.json").read_text()
    (src / "tokenizer.json").write_text(text[: len(text) // 2])
    _fails(capsys, [src], f"{src / 'tokenizer.json'}: cannot be parsed as a tokenizer", tmp_path / "out")


def test_tokenizer_ids_beyond_the_vocabulary(capsys, tmp_path, src):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(vocab - tok.get_vocab_size(with_added_tokens=True) + 1)])
    tok.save(str(src / "tokenizer.json"))
    top = max(AutoTokenizer.from_pretrained(str(src)).get_vocab().values())  # what the engine would see
    assert top >= vocab
    _fails(capsys, [src], f"token id {top} ('<extra_", tmp_path / "out")


# --- an adapter made for another family ------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, refused",
    [
        ({"auto_mapping": {"base_model_class": "MistralForCausalLM"}}, "auto_mapping.base_model_class 'MistralForCausalLM' is mistral"),
        ({"auto_mapping": {"base_model_class": "Qwen2BiModel"}}, "is qwen2"),  # LLM2Vec's class names
        ({"auto_mapping": {"base_model_class": "Phi3ForCausalLM"}}, "is phi3"),  # any transformers class
        ({"auto_mapping": None, "base_model_name_or_path": "MISTRAL_DIR"}, "base_model_name_or_path"),
        ({"auto_mapping": {"base_model_class": "LlamaBiModel"}, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, None),
        ({"auto_mapping": {"base_model_class": "MyOwnEncoder"}, "base_model_name_or_path": "someone/some-model"}, None),
    ],
)
def test_adapter_for_another_family_refused(capsys, tmp_path, lora_copy, edit, refused):
    mistral = ck.tiny("mistral")  # the same shapes as the tiny Llama: only the family tells them apart
    config = json.loads((lora_copy / "adapter_config.json").read_text())
    config.update({k: str(mistral) if v == "MISTRAL_DIR" else v for k, v in edit.items()})
    (lora_copy / "adapter_config.json").write_text(json.dumps(config))
    if refused is None:  # a family that matches, or one that cannot be told: converted
        capsys.readouterr()
        assert main([str(ck.tiny("llama")), str(tmp_path / "out"), "--lora", str(lora_copy), "--quiet"]) == 0
        return
    _fails(capsys, [ck.tiny("llama"), "--lora", lora_copy], "adapter made for another model family: ", tmp_path / "out")
    rc = main([str(ck.tiny("llama")), str(tmp_path / "out"), "--lora", str(lora_copy), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and refused in err and err.strip().endswith("is llama"), err
