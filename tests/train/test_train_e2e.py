"""The recipe end to end on a tiny model: MNTP, then SimCSE or supervised on the merged MNTP model;
held-out losses go down; the adapters load into peft on the transformers model with every key found
and give there the embeddings the engine gives after ``hf2engine --lora``; resuming; bad input."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from converters.convert import convert
from converters.tiny_models import save_lora_adapter, save_tiny_checkpoint
from engine import Engine
from engine.train import make_config, train
from engine.train.cli import main

from .conftest import INSTRUCTION, TINY, eval_losses, reference_embeddings

FAST = dict(batch_size=8, max_seq_length=32, lora_r=8, quiet=True)
INPUTS = [
    "the quick brown fox jumps over the lazy dog",
    (INSTRUCTION, "river mountain city music"),
    "kernel",
    (INSTRUCTION, "what is attention in a language model?"),
    " ".join(["bank loan interest rate"] * 12),  # truncated at MAX_LENGTH
]
MAX_LENGTH = 32


def assert_engine_matches_peft(src, adapters, tmp_path):
    out = convert(src, tmp_path / "engine", loras=adapters, dtype="float32", quiet=True)
    actual = Engine.from_pretrained(out, dtype=torch.float32, max_length=MAX_LENGTH).encode(INPUTS)
    expected = reference_embeddings(src, adapters, INPUTS, MAX_LENGTH)
    err = (actual.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert err.max() < 1e-4, err.tolist()
    return actual


@pytest.fixture(scope="module")
def mntp(llama, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("mntp") / "adapter"
    train(make_config("mntp", model=str(llama), data=str(corpus["mntp"]), eval_data=str(corpus["mntp_eval"]),
                      out=str(out), mask_token="eos", steps=40, lr=5e-3, eval_steps=40, save_steps=20, log_steps=10, **FAST))
    return out


@pytest.fixture(scope="module")
def simcse(llama, corpus, mntp, tmp_path_factory):
    out = tmp_path_factory.mktemp("simcse") / "adapter"
    train(make_config("simcse", model=str(llama), lora=[str(mntp)], data=str(corpus["simcse"]),
                      eval_data=str(corpus["simcse_eval"]), out=str(out), steps=20, lr=5e-3, eval_steps=20, **FAST))
    return out


@pytest.fixture(scope="module")
def supervised(llama, corpus, mntp, tmp_path_factory):
    out = tmp_path_factory.mktemp("supervised") / "adapter"
    train(make_config("supervised", model=str(llama), lora=[str(mntp)], data=str(corpus["pairs"]),
                      eval_data=str(corpus["pairs_eval"]), out=str(out), steps=20, lr=5e-3, warmup_steps=2,
                      eval_steps=20, **FAST))
    return out


def test_mntp_lowers_its_held_out_loss_and_writes_its_outputs(mntp):
    before, after = eval_losses(mntp)[0], eval_losses(mntp)[-1]
    assert after < 0.9 * before, (before, after)
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.json", "log.jsonl"):
        assert (mntp / name).is_file(), name
    assert (mntp / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in mntp.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    assert not list(mntp.parent.glob(".*"))  # no temporary directory left behind
    config = json.loads((mntp / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 8, 16, 0.05)
    keys = load_file(str(mntp / "adapter_model.safetensors"))
    assert len(keys) == 2 * 7 * TINY["num_layers"]
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in keys
    records = [json.loads(line) for line in (mntp / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30, 40]
    assert all(r["lr"] > 0 for r in records if "lr" in r)


def test_mntp_adapter_in_peft_matches_the_engine(llama, mntp, tmp_path):
    assert_engine_matches_peft(llama, [mntp], tmp_path)


def test_simcse_lowers_its_held_out_loss_and_matches_peft(llama, mntp, simcse, tmp_path):
    losses = eval_losses(simcse)
    assert losses[-1] < 0.7 * losses[0], losses
    both = assert_engine_matches_peft(llama, [mntp, simcse], tmp_path / "both")
    only_mntp = Engine.from_pretrained(convert(llama, tmp_path / "mntp", loras=[mntp], dtype="float32", quiet=True),
                                       max_length=MAX_LENGTH).encode(INPUTS)
    assert not torch.allclose(both, only_mntp, rtol=1e-2)  # the SimCSE adapter does something


def test_supervised_lowers_its_held_out_loss_and_matches_peft(llama, mntp, supervised, tmp_path):
    losses = eval_losses(supervised)
    assert losses[-1] < 0.7 * losses[0], losses
    assert_engine_matches_peft(llama, [mntp, supervised], tmp_path)


def test_saved_adapter_is_the_one_trained(llama, tmp_path):
    """The engine model with LoRA (as trained) embeds like Engine.encode after converting with the saved
    adapter: the fused-row slices are saved under the right projection names (k and v have the same
    shape here, so only this test would notice them swapped), and training pools as encode does."""
    from engine.train.config import LORA_TARGETS
    from engine.train.lora import apply_lora, save_adapter
    from engine.train.objectives import embed

    base = Engine.from_pretrained(convert(llama, tmp_path / "base", dtype="float32", quiet=True), max_length=MAX_LENGTH)
    model = base.model
    without = base.encode(INPUTS)
    torch.manual_seed(0)
    apply_lora(model, list(LORA_TARGETS), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    adapter = save_adapter(model, tmp_path / "adapter", r=4, alpha=8, dropout=0.0, targets=list(LORA_TARGETS),
                           layout="causal_lm", base_model=str(llama))
    with torch.no_grad():
        expected = embed(model, base.tokenize(INPUTS))
    merged = Engine.from_pretrained(convert(llama, tmp_path / "merged", loras=[adapter], dtype="float32", quiet=True),
                                    max_length=MAX_LENGTH)
    actual = merged.encode(INPUTS)
    assert ((actual - expected).norm(dim=-1) / expected.norm(dim=-1)).max() < 1e-5
    assert ((actual - without).norm(dim=-1) / expected.norm(dim=-1)).min() > 1e-2


def test_resume_continues_exactly(llama, corpus, mntp, tmp_path):
    """Four steps straight, or two steps, a stop, then --resume: the same adapter."""
    kw = dict(model=str(llama), lora=[str(mntp)], data=str(corpus["pairs"]), steps=4, lr=5e-3, save_steps=2,
              grad_accum=2, **{**FAST, "batch_size": 4})
    straight = train(make_config("supervised", out=str(tmp_path / "a"), **kw))
    interrupted = tmp_path / "b"
    train(make_config("supervised", out=str(interrupted), **kw))
    shutil.rmtree(interrupted / "checkpoint-4")  # as if stopped after the checkpoint at step 2
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (interrupted / name).unlink()
    with pytest.raises(ValueError, match="already exists"):
        train(make_config("supervised", out=str(interrupted), **kw))
    train(make_config("supervised", out=str(interrupted), resume=True, **kw))
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (straight, interrupted))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="already at step 4"):
        train(make_config("supervised", out=str(interrupted), resume=True, **kw))


def test_tied_qwen2_with_blank_mask_and_a_bare_layout(corpus, tmp_path):
    """Qwen2 (q/k/v bias, byte-level tokenizer that has "_", tied LM head): MNTP with the "_" mask,
    then SimCSE saved under the bare *Model names (LLM2Vec's layout), which peft loads into AutoModel."""
    from peft import PeftModel
    from transformers import AutoModel

    src = save_tiny_checkpoint(tmp_path / "hf", "qwen2", seed=2, tie_word_embeddings=True, **TINY)
    mntp = train(make_config("mntp", model=str(src), data=str(corpus["mntp"]), out=str(tmp_path / "mntp"),
                             steps=3, lr=5e-3, **FAST))
    assert_engine_matches_peft(src, [mntp], tmp_path / "e1")
    bare = train(make_config("simcse", model=str(src), lora=[str(mntp)], data=str(corpus["simcse"]),
                             out=str(tmp_path / "simcse"), steps=2, lr=5e-3, adapter_layout="bare", **FAST))
    assert all(k.startswith("base_model.model.layers.") for k in load_file(str(bare / "adapter_model.safetensors")))
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(src)), str(bare))
    check = model.load_adapter(str(bare), adapter_name="check")
    assert not check.missing_keys and not check.unexpected_keys
    convert(src, tmp_path / "e2", loras=[mntp, bare], dtype="float32", quiet=True)  # the converter takes it too


def test_cli_with_a_config_file_and_a_new_mask_token(llama, corpus, tmp_path, capsys):
    """The command line with --config (flags override it); mask_token "mask" adds a training-only row
    that never reaches the adapter; all_mask as in LLM2Vec's Mistral config."""
    config = tmp_path / "mntp.json"
    config.write_text(json.dumps({"model": str(llama), "data": str(corpus["mntp"]), "mask_token": "mask",
                                  "all_mask": True, "mlm_probability": 0.8, "steps": 50, "batch_size": 4,
                                  "max_seq_length": 16, "lora_r": 2, "lora_targets": ["q_proj", "v_proj"]}))
    out = tmp_path / "out"
    code, err = _run(capsys, "mntp", "--config", str(config), "--steps", "2", "--out", str(out), "--quiet")
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["steps"] == 2
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "v_proj"} and len(keys) == 2 * 2 * TINY["num_layers"]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (["q_proj", "v_proj"], ["v_proj", "q_proj"])
    convert(llama, tmp_path / "engine", loras=[out], quiet=True)


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written


def _run(capsys, *argv):
    capsys.readouterr()  # drop what building the fixtures printed
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing data", r"no such data file"),
        ("empty data", r"no text \(the file is empty or blank\)"),
        ("malformed jsonl", r"bad\.jsonl:2: malformed JSON"),
        ("zero steps", r"steps must be a positive integer, got 0"),
        ("adapter for another model", r"adapter made for another model"),
        ("missing model", r"no such directory"),
        ("lm head", r"MNTP needs the checkpoint's LM head"),
        ("blank mask", r'no "_" token'),
    ],
)
def test_bad_input_is_one_clear_line(case, pattern, llama, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positive": "p"}\n{"query": "q" "positive": "p"}\n')
    common = ["--out", str(out), "--quiet", "--steps", "2", "--batch-size", "2"]
    if case == "missing data":
        argv = ["simcse", "--model", str(llama), "--data", str(tmp_path / "nope.txt"), *common]
    elif case == "empty data":
        argv = ["mntp", "--model", str(llama), "--data", str(empty), "--mask-token", "eos", *common]
    elif case == "malformed jsonl":
        argv = ["supervised", "--model", str(llama), "--data", str(bad), *common]
    elif case == "zero steps":
        argv = ["simcse", "--model", str(llama), "--data", str(corpus["simcse"]), *common, "--steps", "0"]
    elif case == "adapter for another model":
        other = save_tiny_checkpoint(tmp_path / "other", "llama", **{**TINY, "hidden_size": 48})
        adapter = save_lora_adapter(other, tmp_path / "other_lora")
        argv = ["simcse", "--model", str(llama), "--lora", str(adapter), "--data", str(corpus["simcse"]), *common]
    elif case == "missing model":
        argv = ["simcse", "--model", str(tmp_path / "nope"), "--data", str(corpus["simcse"]), *common]
    elif case == "lm head":
        bare = save_tiny_checkpoint(tmp_path / "bare", "llama", bare_model=True, tie_word_embeddings=False, **TINY)
        argv = ["mntp", "--model", str(bare), "--data", str(corpus["mntp"]), "--mask-token", "eos", *common]
    else:  # the tiny Llama tokenizer has no "_" token
        argv = ["mntp", "--model", str(llama), "--data", str(corpus["mntp"]), *common]
    code, err = _run(capsys, *argv)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("engine.train: error: "), err
    assert re.search(pattern, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_existing_output_is_not_overwritten(llama, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, "simcse", "--model", str(llama), "--data", str(corpus["simcse"]), "--out", str(out), "--quiet")
    assert code == 2 and "already exists" in err and "--resume" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
