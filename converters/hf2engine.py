"""``python -m converters.hf2engine SRC OUT [options]``: the converter's command line.

    python -m converters.hf2engine SRC OUT [--lora ADAPTER_DIR]... [--dtype bfloat16|float16|float32]
           [--pooling mean|weighted_mean|last_token|bos_token] [--max-length N] [--force] [--quiet]
           [--keep-lm-head] [--attention bidirectional|causal] [--[no-]append-eos] [--[no-]normalize]
           [--[no-]include-prompt]

The conversion itself is :func:`converters.convert.convert`, imported after the arguments are parsed
(``--help`` and usage errors answer without loading torch). Errors are one line and exit status 2; a
signal cleans up, says ``nothing written`` and exits ``128 + signal`` (see :mod:`engine.shell`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from engine import shell
from engine.choices import DTYPE_NAMES, POOLING_MODES
from engine.config import ATTENTION_KINDS

PROG = "hf2engine"


def _parser() -> argparse.ArgumentParser:
    parser = shell.Parser(
        name=PROG, prog="python -m converters.hf2engine",
        description="Convert a local Hugging Face checkpoint (+ PEFT LoRA adapters, merged in order) into the "
        "engine format.",
    )
    parser.add_argument("src", metavar="SRC", help="Hugging Face checkpoint directory (config.json, *.safetensors, "
                        "tokenizer.json) or sentence-transformers directory (modules.json)")
    parser.add_argument("out", metavar="OUT", help="engine directory to write")
    parser.add_argument("--lora", metavar="ADAPTER_DIR", action="append", default=[], help="PEFT LoRA adapter to merge (repeatable; merged in the order given)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="output dtype (default: the source's)")
    parser.add_argument("--pooling", choices=POOLING_MODES,
                        help="default pooling (default: the sentence-transformers Pooling module or llm2vec_config.json, "
                        "else mean)")
    parser.add_argument("--max-length", type=int, metavar="N",
                        help="default max tokens (default: the sentence-transformers max length or llm2vec_config.json, "
                        "else 512)")
    parser.add_argument("--attention", choices=ATTENTION_KINDS,
                        help="default: the config's is_causal / use_bidirectional_attention, else causal for a "
                        "sentence-transformers directory and bidirectional (LLM2Vec) otherwise")
    parser.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=None,
                        help="append the EOS token after truncating to max length - 1 (e5-mistral's last-token "
                        "recipe; never when the tokenizer appends it itself); default: off")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="L2-normalise embeddings by default (default: a sentence-transformers Normalize module)")
    parser.add_argument("--include-prompt", action=argparse.BooleanOptionalAction, default=None,
                        help="pool every token the model reads, prompt and special tokens included, as "
                        "sentence-transformers does; --no-include-prompt pools the text's own tokens only "
                        "(default: the Pooling module's include_prompt, else the LLM2Vec rule)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT (only once the new one is complete)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--keep-lm-head", action="store_true", help="also store a separate lm_head (for MNTP training)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return shell.run(PROG, _parser(), argv, _convert, on_interrupt=lambda args: "nothing written")


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert

    out = convert(args.src, args.out, loras=args.lora, dtype=args.dtype, pooling=args.pooling,
                  max_length=args.max_length, force=args.force, quiet=args.quiet, keep_lm_head=args.keep_lm_head,
                  attention=args.attention, append_eos=args.append_eos, normalize=args.normalize,
                  include_prompt=args.include_prompt)
    if not args.quiet:
        print(f"{PROG}: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
