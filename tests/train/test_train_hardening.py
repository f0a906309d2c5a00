"""engine.train on hostile or careless use: --force never deletes an input, a killed run's leftovers are
swept and nothing else, outputs follow the umask, checkpoints are pruned, resuming refuses a changed
batch or data file and a broken state, the trained pooling travels with the adapter, and every bad
option, device or data line is one line with exit status 2, never a traceback."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

from converters import safety
from converters.convert import ConversionError, convert
from converters.tiny_models import save_tiny_checkpoint
from engine import shell
from engine.format import EngineConfig
from engine.train import loop
from engine.train.cli import main

from .conftest import TINY, write_lines

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--quiet", "--steps", "2", "--batch-size", "4", "--max-seq-length", "24", "--lora-r", "2"]


def _run(capsys, *argv):
    capsys.readouterr()  # drop what building the fixtures printed
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def _one_line(code, err, pattern):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("engine.train: error: "), err
    assert "Traceback" not in err and pattern in err, err


# ---------------------------------------------------------------------------------------------------
# --force never deletes an input


@pytest.mark.parametrize("target", ["model", "model via ..", "parent of the data", "the --lora adapter",
                                    "parent of the eval data", "model via a symlinked parent"])
def test_force_never_deletes_an_input(llama, corpus, tmp_path, capsys, target):
    models, data_dir = tmp_path / "models", tmp_path / "data"
    models.mkdir()
    data_dir.mkdir()
    model = shutil.copytree(llama, models / "hf")
    lora = shutil.copytree(llama, models / "not-an-adapter")  # checked as a path before it is opened
    data = shutil.copy(corpus["simcse"], data_dir / "train.txt")
    held = shutil.copy(corpus["simcse_eval"], data_dir / "eval.txt")
    (models / "x").mkdir()
    (tmp_path / "link").symlink_to(models)
    out = {
        "model": model,
        "model via ..": models / "x" / ".." / "hf",
        "parent of the data": data_dir,
        "the --lora adapter": lora,
        "parent of the eval data": data_dir,
        "model via a symlinked parent": tmp_path / "link" / "hf",
    }[target]
    extra = ["--lora", lora] if target == "the --lora adapter" else []
    extra += ["--eval-data", held] if target == "parent of the eval data" else []
    before = {p: sorted(os.listdir(p)) for p in (model, lora, data_dir)}
    code, err = _run(capsys, "simcse", "--model", model, "--data", data, "--out", out, "--force", *extra, *QUICK)
    _one_line(code, err, "--out would overwrite the")
    assert {p: sorted(os.listdir(p)) for p in (model, lora, data_dir)} == before


# ---------------------------------------------------------------------------------------------------
# One training run, looked at from several sides

_KILLED = """
import os, signal, sys
from pathlib import Path
from converters import safety
d = safety.make_temp_dir(Path(sys.argv[1]), "out", "base")
(d / "engine").mkdir()
(d / "engine" / "weights-00001.safetensors").write_bytes(b"half a shard")
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def trained(llama, corpus, tmp_path_factory):
    """SimCSE for 3 steps (weighted-mean pooling, 24 tokens, a checkpoint every step, at most 2 kept),
    under umask 002, beside a base directory left by a run killed with SIGKILL and two look-alikes
    that are not provably a dead run's (no marker; a live owner)."""
    root = tmp_path_factory.mktemp("trained")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(root)], env=env, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = root.glob(".out.base-*")
    unmarked = root / ".out.base-0123abcd"
    unmarked.mkdir()
    (unmarked / "mine.txt").write_text("user data")
    alive = root / ".out.base-89abcdef"
    alive.mkdir()
    safety.write_marker(alive, "base")
    previous = os.umask(0o002)
    try:
        code = main(["simcse", "--model", str(llama), "--data", str(corpus["simcse"]), "--out", str(root / "out"),
                     "--pooling", "weighted_mean", "--save-steps", "1", "--save-total-limit", "2", "--steps", "3",
                     "--batch-size", "4", "--max-seq-length", "24", "--lora-r", "2", "--quiet"])
    finally:
        os.umask(previous)
    assert code == 0
    return {"out": root / "out", "leftover": leftover, "unmarked": unmarked, "alive": alive}


def test_a_killed_base_conversion_is_swept_and_nothing_else(trained):
    assert not trained["leftover"].exists()
    assert (trained["unmarked"] / "mine.txt").read_text() == "user data"
    assert trained["alive"].is_dir()
    assert sorted(p.name for p in trained["out"].parent.iterdir()) == sorted(
        ["out", trained["unmarked"].name, trained["alive"].name])


def test_outputs_follow_the_umask(trained):
    out = trained["out"]
    dirs = [out, *(p for p in out.rglob("*") if p.is_dir())]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(dirs) == 3 and len(files) > 10  # OUT and two checkpoints
    assert {stat.S_IMODE(p.stat().st_mode) for p in dirs} == {0o775}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o664}
    assert not list(out.rglob(safety.MARKER))


def test_save_total_limit_keeps_the_newest_checkpoints(trained):
    assert sorted(p.name for p in trained["out"].glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert [r["step"] for r in map(json.loads, (trained["out"] / "log.jsonl").read_text().splitlines())] == [3]


def test_trained_pooling_and_max_length_travel_with_the_adapter(llama, trained, tmp_path):
    for adapter in (trained["out"], trained["out"] / "checkpoint-3"):
        config = json.loads((adapter / "llm2vec_config.json").read_text())
        assert (config["pooling_mode"], config["max_length"]) == ("weighted_mean", 24)
    cfg = EngineConfig.read(convert(llama, tmp_path / "engine", loras=[trained["out"]], quiet=True))
    assert (cfg.pooling, cfg.max_length) == ("weighted_mean", 24)
    # The adapter records its base class, as peft does: another family of the same shapes is refused.
    mapping = json.loads((trained["out"] / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping == {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"}
    mistral = save_tiny_checkpoint(tmp_path / "mistral", "mistral", seed=1, **TINY)
    with pytest.raises(ConversionError, match="adapter made for another model family"):
        convert(mistral, tmp_path / "wrong", loras=[trained["out"]], quiet=True)


# ---------------------------------------------------------------------------------------------------
# Resuming


@pytest.fixture
def resumable(llama, trained, tmp_path):
    """A copy of the trained OUT and the command that continues it to step 5."""
    out = shutil.copytree(trained["out"], tmp_path / "out")
    return out, ["simcse", "--model", llama, "--out", out, "--pooling", "weighted_mean", "--save-steps", "1",
                 "--save-total-limit", "2", "--steps", "5", "--max-seq-length", "24", "--lora-r", "2", "--quiet",
                 "--resume"]


@pytest.mark.parametrize("change, pattern", [
    ("batch size", "cannot resume with a global batch size of 8 (batch size x processes): it was 4"),
    ("data content", "is not the data this run was trained on"),
    ("step missing", "trainer_state.pt: no valid step (found None in checkpoint-3)"),
    ("step of another checkpoint", "no valid step (found 2 in checkpoint-3)"),
    ("step not a number", "no valid step (found 'three' in checkpoint-3)"),
])
def test_resume_refuses_a_changed_batch_or_data_and_a_broken_state(corpus, resumable, tmp_path, capsys, change,
                                                                   pattern):
    out, argv = resumable
    data, batch = corpus["simcse"], 4
    if change == "batch size":
        batch = 8
    elif change == "data content":
        lines = corpus["simcse"].read_text().splitlines()
        data = write_lines(tmp_path / "other.txt", lines[1:] + lines[:1])  # the same sentences, another order
    else:
        file = out / "checkpoint-3" / "trainer_state.pt"
        state = torch.load(file, weights_only=True)
        if change == "step missing":
            del state["step"]
        else:
            state["step"] = 2 if change == "step of another checkpoint" else "three"
        torch.save(state, file)
    code, err = _run(capsys, *argv, "--data", data, "--batch-size", batch)
    _one_line(code, err, pattern)


# ---------------------------------------------------------------------------------------------------
# One clear line


@pytest.mark.parametrize("objective, length, pattern", [
    ("mntp", 1, "max-seq-length must be at least 2 for mntp"),
    ("simcse", 1, "max-seq-length 1 leaves no room for text: the tokenizer adds 1 special token(s)"),
    ("supervised", 1, "max-seq-length 1 leaves no room for text"),
])
def test_max_seq_length_with_nothing_to_predict_or_pool(llama, corpus, tmp_path, capsys, objective, length, pattern):
    data = corpus["pairs"] if objective == "supervised" else corpus[objective]
    extra = ["--mask-token", "eos"] if objective == "mntp" else []
    code, err = _run(capsys, objective, "--model", llama, "--data", data, "--out", tmp_path / "out", *QUICK,
                     "--max-seq-length", length, *extra)
    _one_line(code, err, pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, pattern", [
    ("cuda", "--device='cuda': CUDA was requested but is not available ("),
    ("cuda:1", "CUDA was requested but is not available"),
    ("gpu", "--device='gpu': expected 'cpu', 'cuda' or 'cuda:N'"),
    ("cpu:0", "--device='cpu:0': expected"),
])
def test_device_errors_name_the_argument(llama, corpus, tmp_path, capsys, monkeypatch, device, pattern):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    code, err = _run(capsys, "simcse", "--model", llama, "--data", corpus["simcse"], "--out", tmp_path / "out",
                     "--device", device, *QUICK)
    _one_line(code, err, pattern)


@pytest.mark.parametrize("values, pattern", [
    ({"model": 5}, "model must be a path (a string), got 5"),
    ({"eval_data": ["a.txt"]}, "eval-data must be a path"),
    ({"device": 0}, "device must be a string"),
    ({"gradient_checkpointing": "yes"}, "gradient-checkpointing must be true or false, got 'yes'"),
    ({"quiet": 1}, "quiet must be true or false"),
    ({"seed": "42"}, "seed must be a non-negative integer, got '42'"),
    ({"warmup_steps": True}, "warmup-steps must be a non-negative integer, got True"),
    ({"save_total_limit": 0}, "save-total-limit must be a positive integer, got 0"),
])
def test_config_file_values_of_the_wrong_type(llama, corpus, tmp_path, capsys, values, pattern):
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"model": str(llama), "data": str(corpus["simcse"]), "out": str(tmp_path / "out"),
                                  "steps": 2, "batch_size": 4, "max_seq_length": 24, "lora_r": 2, **values}))
    code, err = _run(capsys, "simcse", "--config", config)
    _one_line(code, err, pattern)


def test_jsonl_line_with_an_unpaired_surrogate(llama, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "fine", "positive": "also fine"}\n{"query": "bad \\ud800 text", "positive": "p"}\n')
    code, err = _run(capsys, "supervised", "--model", llama, "--data", data, "--out", tmp_path / "out", *QUICK,
                     "--batch-size", "1")
    _one_line(code, err, f"{data}:2: 'query' has an unpaired surrogate '\\ud800' at character 4")


# ---------------------------------------------------------------------------------------------------
# Failures after training started


def test_without_matplotlib_the_plot_is_skipped_with_one_notice(llama, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" raises ImportError
    out = tmp_path / "out"
    code, err = _run(capsys, "simcse", "--model", llama, "--data", corpus["simcse"], "--out", out,
                     *[a for a in QUICK if a != "--quiet"])
    assert code == 0, err
    notices = [line for line in err.splitlines() if "matplotlib is" in line or "loss.png" in line]
    assert notices == ["engine.train: matplotlib is not installed (pip install 'llm-encoder-engine[train]'); "
                       "loss.png will not be drawn"], err
    assert "Traceback" not in err
    assert (out / "adapter_model.safetensors").is_file() and not (out / "loss.png").exists()


def test_without_peft_training_is_refused_before_anything_is_written(llama, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if the train extra were not installed
    out = tmp_path / "out"
    code, err = _run(capsys, "simcse", "--model", llama, "--data", corpus["simcse"], "--out", out, *QUICK)
    _one_line(code, err, "training needs peft, which the train extra installs")
    assert not out.exists()


def _stop_at(monkeypatch, step, exc):
    """Make the objective raise ``exc`` at training step ``step`` (1-based)."""
    real = loop._objective
    calls = []

    def objective(run):
        micro = real(run)

        def stopping(epoch, indices):
            calls.append(1)
            if len(calls) == step:
                raise exc
            return micro(epoch, indices)
        return stopping

    monkeypatch.setattr(loop, "_objective", objective)


def test_ctrl_c_before_the_first_checkpoint_does_not_advise_resume(llama, corpus, tmp_path, capsys, monkeypatch):
    _stop_at(monkeypatch, 2, KeyboardInterrupt())
    out = tmp_path / "out"
    code, err = _run(capsys, "simcse", "--model", llama, "--data", corpus["simcse"], "--out", out, *QUICK,
                     "--steps", "4", "--save-steps", "3")
    assert code == 130
    assert err == ("engine.train: interrupted by SIGINT; stopped before the first checkpoint, so there is nothing "
                   "to resume; nothing was saved"), err
    assert not out.exists()  # what the run wrote is gone: the same command can simply be run again


def test_a_signal_after_a_checkpoint_advises_resume(llama, corpus, tmp_path, capsys, monkeypatch):
    _stop_at(monkeypatch, 2, shell.Interrupted(signal.SIGTERM))
    out = tmp_path / "out"
    code, err = _run(capsys, "simcse", "--model", llama, "--data", corpus["simcse"], "--out", out, *QUICK,
                     "--steps", "4", "--save-steps", "1")
    assert code == 128 + signal.SIGTERM
    assert err == f"engine.train: interrupted by SIGTERM; continue from {out / 'checkpoint-1'} with --resume", err


def test_disk_full_while_checkpointing_is_one_line_and_leaves_nothing(llama, corpus, tmp_path, capsys, monkeypatch):
    from engine.train import lora

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(lora, "save_file", full)
    out = tmp_path / "out"
    code, err = _run(capsys, "simcse", "--model", llama, "--data", corpus["simcse"], "--out", out, *QUICK)
    _one_line(code, err, f"no space left on device writing {out} (")
    assert sorted(os.listdir(tmp_path)) == []  # no half checkpoint, no OUT, no base directory
