"""``python -m benchmarks.gpu_check --dry-run``: the GPU check's own code, run on a CPU before any GPU.

The dry run executes every section on tiny shapes (the Triton kernels in the interpreter, the encode
sections on the CPU backend), in the processes the real run uses, and writes the JSON and Markdown
results. Its figures measure nothing; what is checked is that every section completes and that the
pieces agree with independent references: the transformers model built on the engine's weights gives
the engine's embeddings, the GPU-only tests are found, the token counts are the corpora's.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _checkpoints import REPO


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("dryrun-*.json")
    results = json.loads(json_path.read_text())
    sections = results["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {name: "ok" for name in sections}
    assert len(sections) == 11

    assert sections["tests"]["data"]["collected"] >= 6  # tests/test_gpu_only_sync.py holds six
    env = sections["env"]["data"]
    assert env["matmul_tflops"] > 0 and env["copy_gbps"] > 0 and env["triton_interpret"]
    rows = sections["attention"]["data"]["rows"]
    assert rows and all(r["engine_tflops"] > 0 and r["sdpa_tflops"] > 0 for r in rows)

    build = sections["encode_build"]["data"]
    uniform, skewed = sections["encode_uniform"]["data"], sections["encode_skewed"]["data"]
    assert uniform["tokens"] == uniform["inputs"] * 32  # the dry run's uniform corpus: 32 tokens each
    assert skewed["tokens"] == sections["transformers"]["data"]["tokens"]
    # transformers on views of the engine's weights, float32: the same embeddings.
    assert sections["transformers"]["data"]["agreement_min_cosine"] > 0.99999
    assert sections["transformers"]["data"]["padded_tokens"] > skewed["tokens"]  # it pads; the engine does not
    query = sections["encode_query"]["data"]
    assert query["graphs"]["reps"] == query["eager"]["reps"] >= 3
    bd = sections["breakdown"]["data"]
    assert abs(sum(bd["fractions"].values()) - 1) < 1e-9 and bd["fractions"]["matmul"] > 0
    assert build["weights_gib"] > 0

    targets = {t["name"]: t for t in results["targets"]}
    assert targets["skewed_vs_transformers"]["value"] > 0 and targets["mfu_uniform_512"]["value"] > 0
    assert targets["attention_d128"]["verdict"] == "not measured"  # the dry run has no head dim 128
    markdown = json_path.with_suffix(".md").read_text()
    assert "| target | measured | goal | verdict |" in markdown and "Dry run on a CPU" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu_check would run for real")
def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
    assert not list(Path(tmp_path).iterdir())
