"""torchrun data parallelism on CPU (2 processes, gloo): the contrastive losses gather embeddings across
processes, so two processes with batch B train exactly like one process with batch 2 B."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.train import make_config, train

REPO = Path(__file__).resolve().parents[2]
COMMON = dict(steps=3, max_seq_length=32, lora_r=4, lora_dropout=0.0, lr=5e-3, warmup_steps=0, log_steps=1, quiet=True)


def _flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _torchrun(objective: str, options: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "engine.train", objective, *_flags(options)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uneven_pairs(corpus, tmp_path_factory):
    """Hard negatives on some lines only, so the processes gather different numbers of them."""
    path = tmp_path_factory.mktemp("pairs") / "uneven.jsonl"
    lines = corpus["pairs"].read_text().splitlines()
    with open(path, "w") as f:
        for i, line in enumerate(lines):
            obj = json.loads(line)
            if i % 3:
                del obj["negative"]
            f.write(json.dumps(obj) + "\n")
    return path


# Supervised, with uneven hard negatives: the variable-size gather that SimCSE's equal views use too
# (each torchrun costs some 40 s of this suite on 2 cores, so SimCSE's is not run again here).
def test_two_processes_train_like_one_with_the_global_batch(llama, uneven_pairs, tmp_path):
    objective = "supervised"
    options = dict(model=str(llama), data=str(uneven_pairs), **COMMON)
    one = train(make_config(objective, out=str(tmp_path / "one"), batch_size=8, **options))
    result = _torchrun(objective, {**options, "out": str(tmp_path / "two"), "batch_size": 4})
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    # The same global-batch loss at every step (process 0 logs it)...
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    # ...and the same adapter after three AdamW steps.
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-3 * a[key].abs().max() + 1e-7, key
    assert not any(torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)
