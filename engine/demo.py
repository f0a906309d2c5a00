"""The Quickstart's main job on an embedded default model.

Builds a small Llama-family checkpoint with random weights (no model hub needed), converts it with
``converters.hf2engine``, encodes a few sentences with and without instructions, and prints the
shapes, a cosine-similarity table and the throughput. Random weights give meaningless similarities:
this shows the pipeline end to end, not embedding quality.

    python -m engine.demo [--workdir DIR] [--backend reference|triton|cpu] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import shell
from .choices import BACKENDS

PROG = "engine.demo"

DEMO_INPUTS = [
    "The river flows through the city toward the mountain.",
    ("Retrieve a passage that answers the question", "Where does the river flow?"),
    "A kernel fuses memory reads to make attention fast.",
    ("Given a scientific claim, find papers that support it", "Fused kernels reduce memory traffic."),
]


def _parser() -> argparse.ArgumentParser:
    parser = shell.Parser(name=PROG, prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoints here (default: a temp dir)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="engine backend (default: triton on CUDA, cpu on the CPU)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return shell.run(PROG, _parser(), argv, _demo, on_interrupt=lambda args: "stopped")


def _demo(args: argparse.Namespace) -> None:
    import torch

    from converters.convert import convert
    from converters.tiny_models import sample_sentences, save_tiny_checkpoint

    from .encoder import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="engine-demo-"))
    try:
        hf_dir, engine_dir = workdir / "tiny-llama-hf", workdir / "tiny-llama-engine"
        print(f"1. building a random Llama-family checkpoint in {hf_dir}")
        save_tiny_checkpoint(hf_dir, "llama", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                             intermediate_size=688, vocab_size=512, max_shard_size="2MB")
        print(f"2. converting it: python -m converters.hf2engine {hf_dir} {engine_dir}")
        convert(hf_dir, engine_dir, force=True, quiet=True)
        engine = Engine.from_pretrained(engine_dir, device=device, backend=args.backend)
        print(f"3. loaded: {engine.config.model.family}, hidden {engine.hidden_size}, "
              f"{engine.config.model.num_layers} layers, dtype {engine.model.embed.weight.dtype}, "
              f"backend {engine.model.ops.name}, device {engine.device}")

        emb = engine.encode(DEMO_INPUTS, normalize=True)
        print(f"\n4. encode({len(DEMO_INPUTS)} inputs) -> {tuple(emb.shape)} {emb.dtype}, row norms "
              + ", ".join(f"{n:.3f}" for n in emb.norm(dim=-1).tolist()))
        for i, item in enumerate(DEMO_INPUTS):
            print(f"   [{i}] " + (item if isinstance(item, str) else f"({item[0]!r}, {item[1]!r})"))
        print("\n   cosine similarity")
        sims = emb @ emb.T
        print("        " + "".join(f"  [{j}] " for j in range(len(DEMO_INPUTS))))
        for i, row in enumerate(sims.tolist()):
            print(f"   [{i}] " + "".join(f"{v:6.3f}" for v in row))

        corpus = sample_sentences(512, seed=7)
        n_tokens = sum(len(ids) for ids in engine.tokenizer(corpus)["input_ids"])
        engine.encode(corpus[:32])  # warm-up
        start = time.perf_counter()
        engine.encode(corpus, batch_size=64)
        elapsed = time.perf_counter() - start
        print(f"\n5. throughput: {len(corpus)} sentences, {n_tokens} tokens in {elapsed:.2f} s "
              f"= {n_tokens / elapsed:,.0f} tokens/s on {engine.device} ({engine.model.ops.name} backend)")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
