"""The training loop: load the base through the converter, add LoRA, AdamW with linear warm-up and
decay, gradient accumulation, data parallelism, checkpoints that resume, a loss curve.

Output directory ``OUT``:
- ``adapter_config.json``, ``adapter_model.safetensors``: the final adapter (PEFT format);
- ``checkpoint-STEP/``: the adapter at that step plus ``trainer_state.pt`` (optimizer and schedule
  state, history; read back with ``torch.load(weights_only=True)``);
- ``llm2vec_config.json`` beside each adapter: the pooling and max length it was trained with
  (LLM2Vec's file; ``hf2engine --lora`` takes its defaults from it);
- ``train_config.json`` (the options used), ``log.jsonl`` (one line per logged step or evaluation),
  ``loss.png`` (the loss curve, when matplotlib is installed).

``OUT`` may never be, or contain, the model, an adapter or a data file (compared resolved), so
``--force`` cannot delete them; a run stopped before its first checkpoint removes what it wrote.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from converters.safety import (
    MARKER,
    disk_full_line,
    is_disk_full,
    make_temp_dir,
    overlapping_input,
    remove_owned,
    resolve_path,
    sweep,
)
from engine.format import sha256_file

from ..batch import pack
from ..config import ConfigError, ModelConfig
from ..model import EncoderModel
from . import distributed
from .config import TrainConfig, TrainError
from .data import (
    BatchOrder,
    DataError,
    mask_tokens,
    mntp_chunks,
    pair_examples,
    read_pairs,
    read_texts,
    text_examples,
    example_seed,
)
from .lora import apply_lora, load_adapter_weights, save_adapter
from .objectives import embed, mntp_loss, simcse_loss, supervised_loss

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
LOG_FILE = "log.jsonl"
LOSS_PLOT = "loss.png"
# Options that must not change when resuming: they shape the adapter or the objective, or they change
# which examples each step reads (a silently different data order).
_RESUME_FIXED = ("objective", "lora_r", "lora_alpha", "lora_targets", "adapter_layout", "lora", "grad_accum", "seed",
                 "max_seq_length")


@dataclass
class Run:
    """Everything a training step needs."""

    cfg: TrainConfig
    ctx: distributed.Context
    model: EncoderModel
    tokenizer: Any
    train_set: list
    eval_set: list | None
    vocab_size: int
    mask_id: int | None = None
    random_vocab: int = 0
    layout: str = "causal_lm"
    base_model: str = ""  # recorded in adapter_config.json
    base_model_class: str | None = None  # recorded as peft's auto_mapping (the transformers class)
    autocast_dtype: torch.dtype | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    data_sha256: str = ""  # the training file's content, checked on resume
    plot: bool = True  # matplotlib is importable

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)


def train(cfg: TrainConfig) -> Path:
    """Train ``cfg.objective`` and write the adapter to ``cfg.out``; returns ``cfg.out``.

    User errors raise :class:`TrainError` (or the converter's ``ConversionError``) before anything is
    written under ``cfg.out``.
    """
    cfg.validate()
    if importlib.util.find_spec("peft") is None:  # adapters are written with peft's LoraConfig
        raise TrainError("training needs peft, which the train extra installs: pip install -e '.[train]'")
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx)
    except Exception as exc:
        if is_disk_full(exc):  # safetensors wraps the OSError; a checkpoint being written was removed
            raise TrainError(disk_full_line(resolve_path(cfg.out))) from None
        raise
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: distributed.Context) -> Path:
    from converters.sources import Checkpoint

    out = resolve_path(cfg.out)
    _check_inputs(out, cfg)
    resume_from = _check_out(out, cfg)
    ckpt = Checkpoint.open(cfg.model)
    try:
        model_cfg = ModelConfig.from_hf(ckpt.config)
    except ConfigError as exc:
        raise TrainError(f"{ckpt.path / 'config.json'}: {exc}") from None
    layout = cfg.adapter_layout
    if layout == "auto":
        layout = "causal_lm" if "model.embed_tokens.weight" in ckpt.tensors else "bare"
    if cfg.objective == "mntp" and not model_cfg.tie_word_embeddings and "lm_head.weight" not in ckpt.tensors:
        raise TrainError(f"{ckpt.path}: MNTP needs the checkpoint's LM head and this checkpoint has none (a bare *Model)")
    tokenizer = _tokenizer(ckpt.path)
    _check_room_for_text(cfg, tokenizer)

    run = Run(cfg, ctx, None, tokenizer, [], None, model_cfg.vocab_size, layout=layout,  # type: ignore[arg-type]
              base_model=str(ckpt.path), base_model_class=_base_model_class(model_cfg, layout))
    run.train_set = _dataset(run, cfg.data)
    run.data_sha256 = sha256_file(Path(cfg.data))
    state = _read_checkpoint(run, resume_from) if resume_from is not None else None  # refused before the load
    run.eval_set = _dataset(run, cfg.eval_data) if cfg.eval_data else None
    order = BatchOrder(len(run.train_set), cfg.batch_size, ctx.world, ctx.rank, cfg.seed)
    if cfg.objective == "mntp":
        run.mask_id = _mask_id(cfg.mask_token, tokenizer, model_cfg)
        run.random_vocab = min(len(tokenizer), model_cfg.vocab_size)

    compute_dtype = _compute_dtype(cfg.dtype, ctx.device)
    run.autocast_dtype = None if compute_dtype == torch.float32 else compute_dtype
    run.model = model = _load_base(cfg, ctx, ckpt.path, out, compute_dtype)
    if run.mask_id == model_cfg.vocab_size:  # a new mask token: one extra, frozen, training-only row
        _add_mask_row(model)
    model.gradient_checkpointing = cfg.gradient_checkpointing

    torch.manual_seed(cfg.seed)  # identical initial adapter on every process
    params = apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.alpha, cfg.lora_dropout)
    distributed.broadcast_parameters(ctx, params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(cfg.warmup_steps, cfg.steps))
    start = 0
    if resume_from is not None:
        start = _restore_checkpoint(run, resume_from, state, optimizer, scheduler)

    run.plot = _plot_available(cfg, ctx)
    created = False
    if ctx.is_main:
        created = _prepare_out(out, cfg, resume_from is not None)
    distributed.barrier(ctx)
    try:
        _loop(run, out, start, optimizer, scheduler, params, order)
    except BaseException:
        if ctx.is_main and resume_from is None and last_checkpoint(out) is None:
            _discard_out(out, created)  # nothing to resume from: leave OUT as it was before the run
        raise
    if ctx.is_main:
        _save_adapter(run, out)
        _plot(run, out)
        if not cfg.quiet:
            print(f"engine.train: wrote {out}", file=sys.stderr)
    distributed.barrier(ctx)
    return out


def _loop(run: Run, out: Path, start: int, optimizer, scheduler, params, order: BatchOrder) -> None:
    """Steps ``start`` .. ``cfg.steps``, with logging, evaluation and checkpoints."""
    cfg, ctx, model = run.cfg, run.ctx, run.model
    micro_loss = _objective(run)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.objective}", unit="step",
               disable=cfg.quiet or not ctx.is_main, file=sys.stderr, dynamic_ncols=True)
    model.train()
    if run.eval_set is not None and start == 0:
        _evaluate_and_log(run, out, 0)  # the held-out loss before training, for the curve
    try:
        for step in range(start, cfg.steps):
            # Dropout depends on (seed, step, rank) only: a resumed run draws what the original would have.
            torch.manual_seed(example_seed(cfg.seed, step + 1, ctx.rank))
            total = 0.0
            for m in range(cfg.grad_accum):
                epoch, indices = order(step * cfg.grad_accum + m)
                with run.autocast():
                    loss = micro_loss(epoch, indices)
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
            distributed.average_gradients(ctx, params)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = distributed.mean_over_processes(ctx, total)
            if not math.isfinite(loss_value):
                raise TrainError(f"step {step + 1}: the loss is {loss_value}; lower --lr or check the data")
            done = step + 1
            record = {"step": done, "loss": loss_value, "lr": lr, "epoch": epoch}
            run.history.append(record)
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if ctx.is_main and (done % cfg.log_steps == 0 or done == cfg.steps):
                _log(out, record)
                if not cfg.quiet:
                    bar.write(f"step {done}/{cfg.steps}  loss {loss_value:.4f}  lr {lr:.3e}", file=sys.stderr)
            if run.eval_set is not None and (done % cfg.eval_steps == 0 or done == cfg.steps):
                _evaluate_and_log(run, out, done)
            if done % cfg.save_steps == 0 or done == cfg.steps:
                if ctx.is_main:
                    _save_checkpoint(run, out, done, optimizer, scheduler)
                distributed.barrier(ctx)
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------
# Set-up


def _check_inputs(out: Path, cfg: TrainConfig) -> None:
    """OUT may not be, or contain, an input: ``--force`` deletes OUT and training writes into it."""
    inputs = [("--model", cfg.model), *(("--lora", p) for p in cfg.lora), ("--data", cfg.data)]
    if cfg.eval_data:
        inputs.append(("--eval-data", cfg.eval_data))
    for flag, path in inputs:
        if overlapping_input(out, [path]) is not None:
            raise TrainError(f"{out}: --out would overwrite the {flag} input {path} (OUT is, or contains, it); "
                             "choose another --out")


def _check_room_for_text(cfg: TrainConfig, tokenizer: Any) -> None:
    """Contrastive inputs are pooled over their text tokens: the special tokens the tokenizer adds
    must leave room for at least one."""
    if cfg.objective == "mntp":
        return
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if cfg.max_seq_length <= specials:
        raise TrainError(f"max-seq-length {cfg.max_seq_length} leaves no room for text: the tokenizer adds "
                         f"{specials} special token(s) to every input, so nothing would be pooled")


def _base_model_class(model_cfg: ModelConfig, layout: str) -> str:
    """The transformers class the adapter's module names are those of (peft's auto_mapping)."""
    from ..config import _CLASS_PREFIXES

    return _CLASS_PREFIXES[model_cfg.family] + ("ForCausalLM" if layout == "causal_lm" else "Model")


def _check_out(out: Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from (``--resume``), after checking ``out`` may be written."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a directory")
    if cfg.resume:
        last = last_checkpoint(out) if out.is_dir() else None
        if last is None:
            raise TrainError(f"{out}: no checkpoint-N directory to resume from")
        return last
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise TrainError(f"{out}: already exists and is not empty; pass --resume to continue its last checkpoint or --force to start over")
    return None


def last_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out) if out.is_dir() else []
    return found[-1] if found else None


def _prepare_out(out: Path, cfg: TrainConfig, resuming: bool) -> bool:
    """Create (or with ``--force`` empty) OUT; True when this run created it."""
    if cfg.force and out.exists():
        shutil.rmtree(out)  # never an input: see _check_inputs
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    sweep(out, kinds=("tmp",))  # half-written checkpoints of a killed run
    if not resuming:
        (out / LOG_FILE).write_text("")
    (out / TRAIN_CONFIG).write_text(cfg.to_json())
    return created


def _discard_out(out: Path, created: bool) -> None:
    """Remove what a fresh run wrote into OUT (it stopped before any checkpoint), and OUT if it made it."""
    for name in (LOG_FILE, TRAIN_CONFIG, LOSS_PLOT):
        (out / name).unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()
        except OSError:
            pass


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not tokenizer.is_fast:
        raise TrainError(f"{path}: the tokenizer must be a fast tokenizer (tokenizer.json) to give offsets")
    return tokenizer


def _dataset(run: Run, path: str) -> list:
    cfg = run.cfg
    if cfg.objective == "mntp":
        chunks = mntp_chunks(run.tokenizer, read_texts(path), cfg.max_seq_length)
        if not chunks:
            raise DataError(f"{path}: too little text for one MNTP sequence")
        return chunks
    if cfg.objective == "simcse":
        return text_examples(run.tokenizer, read_texts(path), cfg.max_seq_length)
    return pair_examples(run.tokenizer, read_pairs(path), cfg.max_seq_length, path)


def _mask_id(kind: str, tokenizer: Any, model_cfg: ModelConfig) -> int:
    """LLM2Vec's ``mask_token_type``: blank "_" (default), eos, or a new token (the id one past the vocab)."""
    if kind == "blank":
        token_id = tokenizer.convert_tokens_to_ids("_")
        if token_id is None or (token_id == tokenizer.unk_token_id and tokenizer.unk_token != "_"):
            raise TrainError('the tokenizer has no "_" token for --mask-token blank; use --mask-token eos or mask')
    elif kind == "eos":
        token_id = tokenizer.eos_token_id
        if token_id is None:
            raise TrainError("the tokenizer has no EOS token for --mask-token eos; use blank or mask")
    else:
        return model_cfg.vocab_size
    if not 0 <= token_id < model_cfg.vocab_size:
        raise TrainError(f"mask token id {token_id} is outside the model's vocabulary of {model_cfg.vocab_size}")
    return int(token_id)


def _add_mask_row(model: EncoderModel) -> None:
    old = model.embed.weight
    weight = torch.cat([old, old.mean(0, keepdim=True)]).detach()
    model.embed = torch.nn.Embedding.from_pretrained(weight, freeze=True)


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _load_base(cfg: TrainConfig, ctx: distributed.Context, src: Path, out: Path, dtype: torch.dtype) -> EncoderModel:
    """The base (with ``cfg.lora`` merged, and the LM head for MNTP) as an :class:`EncoderModel`.

    The Hugging Face -> engine mapping and the LoRA merge are the converter's: rank 0 converts into a
    temporary engine directory, every process loads it, rank 0 removes it.
    """
    from converters.convert import convert
    from converters.sources import ConversionError

    from ..shell import error_line

    tmp_root = out.parent if out.parent.is_dir() else Path(tempfile.gettempdir())
    error, path = None, None
    if ctx.is_main:
        try:
            sweep(tmp_root, [out.name], kinds=("base",))  # what a killed run left
            path = make_temp_dir(tmp_root, out.name, "base")
            convert(src, path / "engine", loras=cfg.lora, dtype=str(dtype).removeprefix("torch."), quiet=True,
                    keep_lm_head=cfg.objective == "mntp")
        except (ConversionError, OSError) as exc:
            error = error_line(exc)
    error, path = distributed.broadcast_object(ctx, (error, path))
    try:
        if error is not None:
            raise TrainError(error)
        model = EncoderModel.from_engine_dir(path / "engine", ctx.device, dtype)
        distributed.barrier(ctx)
    finally:
        if ctx.is_main and path is not None:
            remove_owned(path)
    return model


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Hugging Face's ``get_linear_schedule_with_warmup``: 0 -> 1 over ``warmup`` steps, then -> 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


# ---------------------------------------------------------------------------------------------------
# Objectives on this run's data


def _objective(run: Run) -> Callable[[int, list[int]], torch.Tensor]:
    cfg, model = run.cfg, run.model
    if cfg.objective == "mntp":
        return lambda epoch, indices: _mntp_batch_loss(run, [run.train_set[i] for i in indices],
                                                       [example_seed(cfg.seed, epoch, i) for i in indices])
    if cfg.objective == "simcse":
        def simcse(epoch: int, indices: list[int]) -> torch.Tensor:
            items = [run.train_set[i] for i in indices]
            views = embed(model, items + items, cfg.pooling, cfg.simcse_dropout)
            return simcse_loss(views[: len(items)], views[len(items):], cfg.loss_scale, distributed.gather)
        return simcse

    def supervised(epoch: int, indices: list[int]) -> torch.Tensor:
        return _supervised_batch_loss(run, [run.train_set[i] for i in indices], distributed.gather)
    return supervised


def _mntp_batch_loss(run: Run, chunks: list, seeds: list[int]) -> torch.Tensor:
    cfg = run.cfg
    inputs, labels = [], []
    for chunk, seed in zip(chunks, seeds):
        ids, lab = mask_tokens(torch.tensor(chunk.input_ids), torch.tensor(chunk.special), cfg.mlm_probability,
                               run.mask_id, run.random_vocab, cfg.all_mask, torch.Generator().manual_seed(seed))
        inputs.append(ids.tolist())
        labels.append(lab)
    device = run.model.embed.weight.device
    return mntp_loss(run.model, pack(inputs, device), torch.cat(labels).to(device), run.vocab_size)


def _supervised_batch_loss(run: Run, pairs: list, gather) -> torch.Tensor:
    cfg = run.cfg
    negatives = [p.negative for p in pairs if p.negative is not None]
    items = [p.query for p in pairs] + [p.positive for p in pairs] + negatives
    emb = embed(run.model, items, cfg.pooling)
    n = len(pairs)
    return supervised_loss(emb[:n], emb[n : 2 * n], emb[2 * n :], cfg.loss_scale, gather)


def evaluate(run: Run, dataset: list) -> float:
    """Held-out loss, deterministic: fixed MNTP masks and SimCSE dropout seed, no LoRA dropout, batches
    of the global batch size in file order, no gathering (rank 0 alone)."""
    cfg, model = run.cfg, run.model
    size = cfg.batch_size * run.ctx.world
    minimum = 1 if cfg.objective == "mntp" else 2
    batches = [list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]
    batches = [b for b in batches if len(b) >= minimum]
    if not batches:
        raise DataError(f"{cfg.eval_data}: too few held-out examples for one batch")
    was_training = model.training
    model.eval()
    losses, weights = [], []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[run.ctx.device] if run.ctx.device.type == "cuda" else []), run.autocast():
            torch.manual_seed(cfg.seed)
            for b in batches:
                items = [dataset[i] for i in b]
                if cfg.objective == "mntp":
                    loss = _mntp_batch_loss(run, items, [example_seed(cfg.seed + 1, 0, i) for i in b])
                elif cfg.objective == "simcse":
                    views = embed(model, items + items, cfg.pooling, cfg.simcse_dropout)
                    loss = simcse_loss(views[: len(items)], views[len(items):], cfg.loss_scale)
                else:
                    loss = _supervised_batch_loss(run, items, lambda x: x)
                losses.append(float(loss))
                weights.append(len(b))
    finally:
        model.train(was_training)
    return sum(l * w for l, w in zip(losses, weights)) / sum(weights)


def _evaluate_and_log(run: Run, out: Path, step: int) -> None:
    if run.ctx.is_main:
        value = evaluate(run, run.eval_set)
        record = {"step": step, "eval_loss": value}
        run.history.append(record)
        _log(out, record)
        if not run.cfg.quiet:
            tqdm.write(f"step {step}/{run.cfg.steps}  eval_loss {value:.4f}", file=sys.stderr)
    distributed.barrier(run.ctx)


# ---------------------------------------------------------------------------------------------------
# Checkpoints, logs, plot


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def _llm2vec_config(cfg: TrainConfig) -> dict[str, Any]:
    """What LLM2Vec reads beside an adapter: the max length trained with, and the pooling (contrastive)."""
    config: dict[str, Any] = {"max_length": cfg.max_seq_length}
    if cfg.objective != "mntp":  # the engine's pooling names are LLM2Vec pooling_mode names too
        config |= {"pooling_mode": cfg.pooling, "skip_instruction": True}
    return config


def _save_adapter(run: Run, directory: Path) -> None:
    cfg = run.cfg
    save_adapter(run.model, directory, r=cfg.lora_r, alpha=cfg.alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                 layout=run.layout, base_model=run.base_model, base_model_class=run.base_model_class,
                 llm2vec_config=_llm2vec_config(cfg))


def _save_checkpoint(run: Run, out: Path, step: int, optimizer, scheduler) -> None:
    """``out/checkpoint-STEP``: written in a temporary directory, renamed into place when complete;
    then the oldest checkpoints beyond ``--save-total-limit`` are removed."""
    cfg = run.cfg
    final = out / f"checkpoint-{step}"
    tmp = make_temp_dir(out, final.name)
    try:
        _save_adapter(run, tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "history": run.history, "data_sha256": run.data_sha256,
                 "global_batch_size": cfg.batch_size * run.ctx.world}
        buffer = io.BytesIO()  # serialised first: a failed write is then an OSError that says why
        torch.save(state, buffer)
        (tmp / TRAINER_STATE).write_bytes(buffer.getvalue())
        (tmp / TRAIN_CONFIG).write_text(cfg.to_json())
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        remove_owned(tmp)
        raise
    (final / MARKER).unlink(missing_ok=True)
    if cfg.save_total_limit is not None:
        for old in _checkpoints(out)[: -cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    _plot(run, out)


def _checkpoints(out: Path) -> list[Path]:
    """This run's complete ``checkpoint-STEP`` directories, oldest first."""
    steps = [(int(m[1]), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
             and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(steps)]


def _read_checkpoint(run: Run, path: Path) -> dict[str, Any]:
    """The trainer state of ``path``, once it is known to continue this run: same options that shape
    the adapter and the data order, same data file content, same global batch, a valid step."""
    cfg = run.cfg
    try:
        saved = json.loads((path / TRAIN_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainError(f"{path / TRAIN_CONFIG}: unreadable ({exc})") from None
    if not isinstance(saved, dict):
        raise TrainError(f"{path / TRAIN_CONFIG}: not a JSON object of options")
    current = json.loads(cfg.to_json())
    changed = [k for k in _RESUME_FIXED if saved.get(k) != current.get(k)]
    if changed:
        raise TrainError(f"{path}: cannot resume with different {', '.join(changed)} (saved: "
                         + ", ".join(f"{k}={saved.get(k)!r}" for k in changed) + ")")
    state_file = path / TRAINER_STATE
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file
        raise TrainError(f"{state_file}: cannot resume from it ({' '.join(str(exc).split())[:200]})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or f"checkpoint-{step}" != path.name or step < 1:
        raise TrainError(f"{state_file}: no valid step (found {step!r} in {path.name}); cannot resume from it")
    global_batch = cfg.batch_size * run.ctx.world
    if state.get("global_batch_size") != global_batch:
        raise TrainError(f"{path}: cannot resume with a global batch size of {global_batch} (batch size x processes): "
                         f"it was {state.get('global_batch_size')!r}, and the data order depends on it")
    if state.get("data_sha256") != run.data_sha256:
        raise TrainError(f"{path}: cannot resume: the content of {cfg.data} is not the data this run was trained on, "
                         "so the data order would silently change")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise TrainError(f"{state_file}: history is not a list of records; cannot resume from it")
    if step >= cfg.steps:
        raise TrainError(f"{path}: already at step {step} of {cfg.steps}; raise --steps to train further")
    return state


def _restore_checkpoint(run: Run, path: Path, state: dict[str, Any], optimizer, scheduler) -> int:
    """Adapter, optimizer and schedule of ``path`` (checked by :func:`_read_checkpoint`); its step."""
    load_adapter_weights(run.model, path, run.layout)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as exc:  # missing keys, another optimizer's state
        raise TrainError(f"{path / TRAINER_STATE}: cannot resume from it ({' '.join(str(exc).split())[:200]})") from None
    run.history = list(state.get("history", []))
    return state["step"]


def _plot_available(cfg: TrainConfig, ctx: distributed.Context) -> bool:
    try:
        import matplotlib  # noqa: F401  (the train extra; without it the run goes on, without loss.png)
    except ImportError:
        pass
    else:
        return True
    if ctx.is_main and not cfg.quiet:
        print("engine.train: matplotlib is not installed (pip install 'llm-encoder-engine[train]'); "
              "loss.png will not be drawn", file=sys.stderr)
    return False


def _plot(run: Run, out: Path) -> None:
    """The loss curve, never at the cost of the run: a failure is one notice, then no more plots."""
    if not run.plot:
        return
    try:
        plot_history(run.history, out / LOSS_PLOT, title=f"{run.cfg.objective}: {Path(run.cfg.data).name}")
    except Exception as exc:  # a broken matplotlib install or backend: the adapter matters, the plot not
        run.plot = False
        print(f"engine.train: cannot draw {out / LOSS_PLOT} ({' '.join(str(exc).split())[:200]}); "
              "skipping the loss plot", file=sys.stderr)


def plot_history(history: list[dict[str, Any]], file: Path, title: str = "") -> None:
    """Training loss (and held-out loss, if any) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if held:
            ax.plot(*zip(*held), "o-", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if train or held:
            ax.legend()
        fig.tight_layout()
        tmp = file.with_name(f".{file.name}.tmp.png")
        fig.savefig(tmp)
        tmp.replace(file)
    finally:
        plt.close(fig)
