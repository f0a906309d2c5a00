"""``python -m engine.embed``: the command line of :func:`engine.embed.embed_corpus`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from .. import shell
from ..choices import COMPUTE_DTYPES
from .options import FORMATS, OUTPUT_DTYPES, EmbedOptions

PROG = "engine.embed"


def _parser() -> argparse.ArgumentParser:
    p = shell.Parser(
        name=PROG, prog=f"python -m {PROG}",
        description="Embed a corpus into sharded, resumable output, in this process or on a Ray cluster "
                    "(see docs/corpus.md).")
    p.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR", help="a directory written by converters.hf2engine")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt (a passage per non-blank line), .jsonl, .csv or .parquet files, or glob patterns")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the output directory")
    out = p.add_argument_group("output")
    out.add_argument("--format", choices=FORMATS, default="parquet",
                     help="parquet (id, embedding) or npy (+ ids.jsonl) shards (default: parquet)")
    out.add_argument("--output-dtype", choices=OUTPUT_DTYPES, default="float32",
                     help="dtype of the stored embeddings (default: float32); independent of --dtype")
    out.add_argument("--shard-size", type=int, default=100_000, metavar="N",
                     help="records per shard: shard k holds records [k*N, (k+1)*N) (default: 100000)")
    inp = p.add_argument_group("inputs")
    inp.add_argument("--text-field", default="text", metavar="NAME", help="the passage field (default: text)")
    inp.add_argument("--id-field", default=None, metavar="NAME",
                     help="the id field, then required in every record (default: 'id' where the input has it, "
                          "else line numbers)")
    inp.add_argument("--skip-bad", action="store_true",
                     help="record unusable records in errors.jsonl and go on (default: stop at the first)")
    model = p.add_argument_group("model")
    prompt = model.add_mutually_exclusive_group()
    prompt.add_argument("--instruction", default=None, metavar="TEXT",
                        help="embed (instruction, passage) pairs: the instruction is read, never pooled")
    prompt.add_argument("--prompt-name", default=None, metavar="NAME", help="a prompt stored in the engine")
    model.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                       help="L2-normalise the embeddings (default: the engine's stored default)")
    model.add_argument("--dtype", choices=COMPUTE_DTYPES, default="auto",
                       help="compute dtype of the model (default: auto = float32 on CPU, bfloat16 on CUDA)")
    model.add_argument("--max-length", type=int, default=None, metavar="N",
                       help="tokens per passage after truncation (default: the engine's)")
    run = p.add_argument_group("execution")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--batch-size", type=int, default=256, metavar="N", help="passages per forward (default: 256)")
    run.add_argument("--max-batch-tokens", type=int, default=16384, metavar="N",
                     help="tokens per forward (default: 16384)")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="a pool of N Ray actors (a local Ray instance unless --ray is given)")
    run.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on a Ray cluster: ADDRESS (auto: the running cluster; default: Ray's own rule)")
    run.add_argument("--gpus-per-worker", type=float, default=1.0, metavar="G",
                     help="GPUs per Ray actor on CUDA (default: 1; fractions share a GPU)")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="torch threads per worker (Ray on CPU: also the CPUs each actor reserves; default: 1 "
                          "there, torch's default locally)")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true",
                       help="finish a job in DIR: keep its complete, intact shards, redo the rest")
    state.add_argument("--force", action="store_true",
                       help="replace the output of an earlier job in DIR (never any other file)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return shell.run(PROG, _parser(), argv, _embed,
                     on_interrupt=lambda args: "the complete shards are kept: rerun with --resume")


def _embed(args: argparse.Namespace) -> None:
    from .job import embed_corpus

    options = EmbedOptions(
        format=args.format, output_dtype=args.output_dtype, dtype=args.dtype, normalize=args.normalize,
        max_length=args.max_length, instruction=args.instruction, prompt_name=args.prompt_name,
        text_field=args.text_field, id_field=args.id_field, shard_size=args.shard_size, device=args.device,
        batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, workers=args.workers, ray=args.ray,
        gpus_per_worker=args.gpus_per_worker, threads=args.threads, skip_bad=args.skip_bad, quiet=args.quiet,
        resume=args.resume, force=args.force)
    embed_corpus(args.engine_dir, args.inputs, args.out, options)
