"""An engine directory that does not describe its weights, or is malformed in any way, is refused at
load with a FormatError naming the file and the field; devices and options are checked by name."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import _checkpoints as ck
from converters.convert import convert
from engine import Engine
from engine.format import ENGINE_CONFIG, WEIGHTS_INDEX, FormatError


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return convert(ck.tiny("llama"), tmp_path_factory.mktemp("errors") / "engine", quiet=True)


@pytest.fixture
def copy(engine_dir, tmp_path):
    def make():
        return ck.copy_tree(engine_dir, tmp_path / "copy")
    return make


def _edit_config(path, edit):
    file = path / ENGINE_CONFIG
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))
    return path


def test_a_config_edited_to_the_same_sizes_is_refused(copy):
    # num_heads * head_dim is unchanged, so every tensor keeps its shape: only the recorded hash tells.
    def edit(data):
        data["model"]["num_heads"] *= 2
        data["model"]["num_kv_heads"] *= 2
        data["model"]["head_dim"] //= 2
    path = _edit_config(copy(), edit)
    with pytest.raises(FormatError, match=r"weights-\d+\.safetensors: written for another model config"):
        Engine.from_pretrained(path)


def test_verify_checks_every_shard_against_its_recorded_sha256(copy, engine_dir):
    assert Engine.from_pretrained(engine_dir, verify=True).hidden_size > 0
    path = copy()
    shard = path / "weights-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: the file still parses and loads
    shard.write_bytes(bytes(data))
    Engine.from_pretrained(path)  # without verify, a flipped weight bit cannot be seen
    with pytest.raises(FormatError, match="weights-00002.safetensors: sha256 .* differs from the recorded"):
        Engine.from_pretrained(path, verify=True)


def test_a_tensor_of_the_wrong_shape_is_named(copy):
    path = copy()
    shard = path / "weights-00002.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["layers.0.o.weight"] = tensors["layers.0.o.weight"][:, :-1].contiguous()
    save_file(tensors, str(shard), metadata=meta)  # same recorded config hash, wrong shape
    with pytest.raises(FormatError, match=r"weights-00002.safetensors: tensor 'layers.0.o.weight' has shape"):
        Engine.from_pretrained(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["model"].update(num_kv_heads=0), "num_kv_heads: expected a positive integer"),
        (lambda d: d["model"].update(hidden_size="64"), "hidden_size: expected a positive integer"),
        (lambda d: d["model"].update(num_layers=10**9), "num_layers=1000000000 is beyond"),
        (lambda d: d["model"].update(num_layers=3), "holds 2 layers but engine_config.json says num_layers=3"),
        (lambda d: d["model"].update(rope_theta=-1.0), "rope_theta: expected a positive finite number"),
        (lambda d: d["model"].update(attention="sideways"), "attention: expected one of"),
        (lambda d: d.update(model=[]), "model: expected a JSON object"),
        (lambda d: d.update(pooling=5), "pooling: expected one of"),
        (lambda d: d.update(prompts=["query"]), "prompts: expected an object"),
        (lambda d: d.update(normalize="yes"), "normalize: expected true or false"),
        (lambda d: d.update(format_version=1), "format_version 1; this engine reads version 2"),
        (lambda d: d.update(extra_field=1), r"unknown fields \['extra_field'\]"),
    ],
)
def test_a_malformed_engine_config_names_its_field(copy, edit, match):
    path = _edit_config(copy(), edit)
    with pytest.raises(FormatError, match=match) as info:
        Engine.from_pretrained(path)
    assert ENGINE_CONFIG in str(info.value) or WEIGHTS_INDEX in str(info.value)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: (p / ENGINE_CONFIG).write_bytes(b"\xff\xfe{"), "engine_config.json: not UTF-8 text"),
        (lambda p: (p / ENGINE_CONFIG).write_text('{"format": NaN}'), "engine_config.json: invalid JSON"),
        (lambda p: (p / "tokenizer.json").write_text('{"truncated": '), "tokenizer.json: cannot load the tokenizer"),
        (lambda p: (p / WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"embed.weight": 5}})),
         r"weights.index.json: weight_map\['embed.weight'\]: expected a shard file name"),
        (lambda p: (p / WEIGHTS_INDEX).write_text("[1]"), "weights.index.json: weight_map: expected an object"),
        (lambda p: (p / "weights-00002.safetensors").unlink(), "weights-00002.safetensors: cannot read weights"),
        (lambda p: (p / "weights-00002.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
         "weights-00002.safetensors: cannot read weights"),
    ],
)
def test_a_damaged_file_is_named(copy, damage, match):
    path = copy()
    damage(path)
    with pytest.raises(FormatError, match=match):
        Engine.from_pretrained(path)


def test_a_tokenizer_beyond_the_vocabulary_is_refused(copy):
    path = copy()
    data = json.loads((path / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 384, "content": "<extra>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="tokenizer.json: token id 384 is outside the model's vocabulary of 384"):
        Engine.from_pretrained(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the request would succeed")
def test_cuda_without_cuda_says_so(engine_dir):
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(ValueError, match="CUDA was requested but is not available"):
            Engine.from_pretrained(engine_dir, device=device)


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:x", "", 3])
def test_an_invalid_device_names_the_argument(engine_dir, device):
    with pytest.raises(ValueError, match=r"device=.*expected 'cpu', 'cuda' or 'cuda:N'"):
        Engine.from_pretrained(engine_dir, device=device)


def test_max_length_beyond_the_trained_context_needs_asking(engine_dir):
    # The tiny checkpoints are saved with max_position_embeddings=4096.
    with pytest.raises(ValueError, match="max_length=5000 exceeds the model's max_position_embeddings=4096"):
        Engine.from_pretrained(engine_dir, max_length=5000)
    assert Engine.from_pretrained(engine_dir, max_length=5000, allow_beyond_max_positions=True).max_length == 5000


def test_load_flags_must_be_booleans(engine_dir):
    for name in ("verify", "split_special_tokens", "allow_beyond_max_positions"):
        with pytest.raises(TypeError, match=name):
            Engine.from_pretrained(engine_dir, **{name: "yes"})


def test_a_missing_tokenizer_is_named(copy):
    path = copy()
    (path / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match="tokenizer.json: missing"):
        Engine.from_pretrained(path)


def test_nothing_in_the_directory_changes_on_a_refused_load(copy):
    path = _edit_config(copy(), lambda d: d["model"].update(num_layers=3))
    before = ck.tree_snapshot(path)
    with pytest.raises(FormatError):
        Engine.from_pretrained(path)
    assert ck.tree_snapshot(path) == before
    shutil.rmtree(path)
