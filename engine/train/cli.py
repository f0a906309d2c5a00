"""``python -m engine.train {mntp,simcse,supervised} ...`` (also under ``torchrun``)."""
from __future__ import annotations

import argparse
from typing import Sequence

from .. import shell
from ..choices import POOLING_MODES
from .config import ADAPTER_LAYOUTS, DTYPES, LORA_TARGETS, MASK_TOKENS, OBJECTIVE_DEFAULTS, make_config

PROG = "engine.train"
USAGE_EPILOG = """\
examples:
  python -m engine.train mntp       --model HF_DIR --data TEXT_FILE --out MNTP_ADAPTER
  python -m engine.train simcse     --model HF_DIR --lora MNTP_ADAPTER --data TEXT_FILE --out SIMCSE_ADAPTER
  python -m engine.train supervised --model HF_DIR --lora MNTP_ADAPTER --data PAIRS.jsonl --out SUP_ADAPTER
  torchrun --nproc_per_node 8 -m engine.train simcse ...   (data parallel, global-batch negatives)
"""


def _targets(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _add_common(p: argparse.ArgumentParser, objective: str) -> None:
    d = OBJECTIVE_DEFAULTS[objective]
    p.add_argument("--config", metavar="FILE.json", help="options as a JSON object (flags given here override it)")
    p.add_argument("--model", metavar="HF_DIR", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--out", metavar="ADAPTER_DIR", help="directory for the adapter, checkpoints, log and loss.png")
    p.add_argument("--eval-data", metavar="FILE", help="held-out data (same format as --data), evaluated every --eval-steps")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {d['steps']})")
    g.add_argument("--batch-size", type=int, help=f"examples per process and micro-batch (default {d['batch_size']})")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']:g})")
    g.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps, then linear decay to 0 (default {d['warmup_steps']})")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping norm, 0 for none (default 1.0)")
    g.add_argument("--max-seq-length", type=int, help=f"tokens per sequence (default {d['max_seq_length']})")
    g.add_argument("--seed", type=int, help="seed for the adapter, data order, masks and dropout (default 42)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each layer in the backward pass (default on)")
    g.add_argument("--dtype", choices=DTYPES, help="auto (default): bfloat16 autocast on CUDA, float32 on CPU")
    g.add_argument("--device", help="auto (default: cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, help=f"rank (default {d['lora_r']})")
    g.add_argument("--lora-alpha", type=float, help="alpha (default 2 r)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapter's input (default 0.05)")
    g.add_argument("--lora-targets", type=_targets, metavar="LIST", help=f"comma-separated (default {','.join(LORA_TARGETS)})")
    g.add_argument("--adapter-layout", choices=ADAPTER_LAYOUTS,
                   help="module names for the checkpoint's class: auto (default), causal_lm (*ForCausalLM), bare (*Model, as LLM2Vec saves)")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--log-steps", type=int, help="log every N steps (default 50)")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps, and at the end (default 200)")
    g.add_argument("--save-total-limit", type=int, metavar="N", help="keep only the newest N checkpoints (default: all)")
    g.add_argument("--eval-steps", type=int, help="evaluate --eval-data every N steps, and at the end (default 100)")
    g.add_argument("--resume", action="store_true", default=None, help="continue from OUT's last checkpoint")
    g.add_argument("--force", action="store_true", default=None, help="replace an existing non-empty OUT")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bar or log lines")


def _parser() -> argparse.ArgumentParser:
    parser = shell.Parser(
        name=PROG, prog=f"python -m {PROG}",
        description="Train LLM2Vec LoRA adapters (MNTP, SimCSE, supervised contrastive) on the engine's reference model.",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="objective", metavar="{mntp,simcse,supervised}", required=True)
    mntp = sub.add_parser("mntp", help="masked next-token prediction (needs the checkpoint's LM head)")
    mntp.add_argument("--data", metavar="TEXT_FILE", help="text, one document or sentence per line")
    _add_common(mntp, "mntp")
    g = mntp.add_argument_group("MNTP")
    g.add_argument("--mlm-probability", type=float, help="fraction of non-special tokens selected (default 0.2)")
    g.add_argument("--mask-token", choices=MASK_TOKENS, help='blank: "_" (default), eos, or mask: a new token')
    g.add_argument("--all-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="replace every selected token by the mask token (LLM2Vec's Mistral setting) instead of 80/10/10")
    for name, help_ in (("simcse", "unsupervised SimCSE: two dropout views of each sentence"),
                        ("supervised", "supervised contrastive on query/positive/negative pairs")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--data", metavar="PAIRS.jsonl" if name == "supervised" else "TEXT_FILE",
                       help='JSONL {"query", "positive", "negative"?, "instruction"?}' if name == "supervised"
                       else "text, one sentence per line")
        p.add_argument("--lora", action="append", metavar="MNTP_ADAPTER",
                       help="adapter merged into the base before training (repeatable, in order)")
        _add_common(p, name)
        g = p.add_argument_group("contrastive")
        g.add_argument("--pooling", choices=POOLING_MODES, help="as Engine.encode (default mean)")
        g.add_argument("--loss-scale", type=float, help=f"cosine similarity scale (default {OBJECTIVE_DEFAULTS[name]['loss_scale']:g})")
        if name == "simcse":
            g.add_argument("--simcse-dropout", type=float, help="dropout on attention probabilities (default 0.3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return shell.run(PROG, _parser(), argv, _train, on_interrupt=_advice)


def _train(args: argparse.Namespace) -> None:
    from .loop import train

    options = {k: v for k, v in vars(args).items() if k not in ("objective", "config")}
    args.resolved = make_config(args.objective, args.config, **options)
    train(args.resolved)


def _advice(args: argparse.Namespace) -> str:
    """What an interrupted run kept: the checkpoint to resume from, if one was written."""
    from converters.safety import resolve_path

    from .loop import last_checkpoint

    cfg = getattr(args, "resolved", None)
    checkpoint = last_checkpoint(resolve_path(cfg.out)) if cfg is not None else None
    if checkpoint is None:
        return "stopped before the first checkpoint, so there is nothing to resume; nothing was saved"
    return f"continue from {checkpoint} with --resume"
