"""The public :class:`Engine`: load a converted checkpoint, turn inputs into embeddings.

One data path, used the same way by ``encode``, the server, the corpus command and training:
inputs -> :meth:`Engine.tokenize` (token ids and pooled tokens) -> batches from :func:`plan_batches`
-> :meth:`Engine.embed_tokenized` (one packed forward, pooling fused with the final norm).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .backends import default_backend, get_ops
from .batch import pack
from .device import resolve_device
from .graphs import BucketedForward
from .choices import POOLING_MODES
from .format import DTYPES, EngineConfig, FormatError
from .inputs import TokenizedExample, TokenizerRules, parse_inputs, pooling_plan, tokenize, tokenizer_rules
from .model import EncoderModel

_AUTO = "auto"


class Engine:
    """A decoder LLM run as a text encoder, ready to embed text.

    Use :meth:`from_pretrained` on a directory written by ``python -m converters.hf2engine``.
    """

    def __init__(
        self, model: EncoderModel, tokenizer: Any, config: EngineConfig, *, path: Path, pooling: str,
        rules: TokenizerRules, cuda_graphs: bool | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.path = path
        self.pooling = pooling
        self.rules = rules
        on_triton_cuda = self.device.type == "cuda" and model.ops.name == "triton"
        if cuda_graphs is None:
            cuda_graphs = on_triton_cuda
        _check_bool("cuda_graphs", cuda_graphs)
        if cuda_graphs and not on_triton_cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device and the triton backend, not {self.device} "
                             f"with backend={model.ops.name!r}")
        # Small batches padded to a bucket shape and replayed from CUDA graphs (engine/graphs.py).
        self._buckets = BucketedForward(model, graphs=True) if cuda_graphs else None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = _AUTO,
        pooling: str | None = None,
        max_length: int | None = None,
        backend: str | None = None,
        *,
        verify: bool = False,
        split_special_tokens: bool = False,
        allow_beyond_max_positions: bool = False,
        cuda_graphs: bool | None = None,
    ) -> "Engine":
        """Load an engine directory.

        ``dtype``: the compute dtype; by default float32 on CPU and bfloat16 on CUDA; ``None`` keeps the
        stored dtype. ``pooling`` and ``max_length`` override the defaults stored at conversion; a
        ``max_length`` beyond the model's ``max_position_embeddings`` is refused unless
        ``allow_beyond_max_positions``. ``backend``: ``"reference"`` (plain PyTorch, the ground truth),
        ``"triton"`` (fused kernels) or ``"cpu"`` (the reference's values computed in place); by
        default ``triton`` on CUDA, ``cpu`` on the CPU and ``reference`` elsewhere. ``verify``: check
        every shard's sha256 against the record written at conversion (reads every byte).
        ``split_special_tokens``: read special-token strings in a text (``"</s>"``) as plain text
        instead of as the special token. ``cuda_graphs``: run batches of up to 2048 tokens and 64
        inputs padded to a bucket shape, from CUDA graphs captured by :meth:`warmup` (or at a shape's
        first use); by default on with the triton backend on CUDA, and only possible there (see
        ``docs/gpu.md``).
        """
        for name, value in (("verify", verify), ("split_special_tokens", split_special_tokens),
                            ("allow_beyond_max_positions", allow_beyond_max_positions)):
            _check_bool(name, value)
        path = Path(path)
        device = resolve_device(device)
        config = EngineConfig.read(path)
        dtype = _resolve_dtype(dtype, config.dtype, device)
        pooling = config.pooling if pooling is None else pooling
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling={pooling!r}: expected one of {POOLING_MODES}")
        if max_length is None:
            max_length = config.max_length
        elif not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length={max_length!r}: expected a positive integer")
        limit = config.model.max_position_embeddings
        if limit is not None and max_length > limit and not allow_beyond_max_positions:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={limit}; "
                             "pass allow_beyond_max_positions=True to run beyond the trained context anyway")
        ops = get_ops(default_backend(device) if backend is None else backend, device)
        tokenizer = _load_tokenizer(path, config.model.vocab_size)
        model = EncoderModel.from_engine_dir(path, device, dtype, verify=verify, config=config)
        model.eval().requires_grad_(False)
        model.ops = ops
        try:
            rules = tokenizer_rules(tokenizer, max_length, config.model.vocab_size, include_prompt=config.include_prompt,
                                    append_eos=config.append_eos, split_special_tokens=split_special_tokens)
        except ValueError as exc:
            raise FormatError(f"{path}: {exc}") from None
        return cls(model, tokenizer, config, path=path, pooling=pooling, rules=rules, cuda_graphs=cuda_graphs)

    # -- properties -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.config.model.hidden_size

    @property
    def max_length(self) -> int:
        return self.rules.max_length

    @property
    def cuda_graphs(self) -> bool:
        return self._buckets is not None

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.config.prompts)

    def __repr__(self) -> str:
        cfg = self.config.model
        return (f"Engine(path={str(self.path)!r}, family={cfg.family!r}, attention={cfg.attention!r}, "
                f"hidden_size={cfg.hidden_size}, layers={cfg.num_layers}, dtype={str(self.dtype).removeprefix('torch.')}, "
                f"device={str(self.device)!r}, backend={self.model.ops.name!r}, pooling={self.pooling!r}, "
                f"max_length={self.max_length})")

    # -- the data path --------------------------------------------------------------------------------

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
        """The prompt to prepend: ``prompt`` as given, the named one, else the stored default (if any)."""
        if prompt is not None and prompt_name is not None:
            raise ValueError("give prompt or prompt_name, not both")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.config.prompts:
                known = ", ".join(sorted(self.config.prompts)) or "none are stored"
                raise ValueError(f"prompt_name={prompt_name!r}: unknown prompt ({known})")
            return self.config.prompts[prompt_name]
        if self.config.default_prompt_name is not None:
            return self.config.prompts[self.config.default_prompt_name]
        return None

    def tokenize(
        self,
        inputs: Sequence[Any],
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = True,
        allow_token_ids: bool = False,
    ) -> list[TokenizedExample]:
        """Validate and tokenise ``inputs`` (strings, ``(instruction, text)`` pairs and, with
        ``allow_token_ids``, lists of token ids) by the engine's rules; each result carries the
        tokens it pools. ``truncate`` False raises :class:`engine.inputs.InputTooLong` for an input
        over ``max_length``. Errors name the input's index."""
        _check_bool("truncate", truncate)
        examples = parse_inputs(inputs, self.resolve_prompt(prompt, prompt_name), allow_token_ids)
        return tokenize(self.tokenizer, examples, self.rules, truncate=truncate,
                        require_text=self.pooling in ("mean", "weighted_mean") and not self.rules.include_prompt)

    def embed_tokenized(self, items: Sequence[TokenizedExample], normalize: bool = False) -> torch.Tensor:
        """One packed forward over ``items``: float32 [len(items), hidden] on the CPU, in order.

        No row depends on the other items (batch invariance). The caller bounds the batch (see
        :func:`plan_batches`); the pooling spans are validated on the host, so the only device
        synchronisation is the final copy.
        """
        return self._launch(items, normalize).result()

    @torch.inference_mode()
    def _launch(self, items: Sequence[TokenizedExample], normalize: bool) -> "_PendingRows":
        """Queue the forward of ``items`` on the device and return at once (on CUDA the kernels run
        asynchronously while the host packs the next batch); ``.result()`` waits for the rows."""
        _check_bool("normalize", normalize)
        if not items:
            return _PendingRows(torch.empty((0, self.hidden_size), dtype=torch.float32), None)
        padded = None if self._buckets is None else self._buckets([t.input_ids for t in items])
        if padded is None:
            batch = pack([t.input_ids for t in items], self.device)
            x, residual = self.model.hidden_before_norm(batch)
        else:  # a bucket shape's graph; the real rows come first
            x, residual, batch = padded
        plan = pooling_plan(list(items), batch, self.pooling)
        cfg, ops = self.config.model, self.model.ops
        # The final residual add and norm are fused into pooling: only pooled rows are normed.
        pooled = ops.norm_pool(x, residual, self.model.norm, cfg.rms_norm_eps, cfg.norm_weight_offset, plan, normalize)
        if pooled.device.type == "cpu":
            return _PendingRows(pooled.float(), None)
        out = torch.empty(pooled.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(pooled, non_blocking=True)  # into pinned memory: a true asynchronous copy
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(pooled.device))
        return _PendingRows(out, done)

    def encode(
        self,
        inputs: str | Sequence[str | tuple[str, str] | list[str]],
        normalize: bool | None = None,
        batch_size: int = 64,
        show_progress_bar: bool = False,
        convert_to_numpy: bool = False,
        max_batch_tokens: int = 16384,
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
    ) -> torch.Tensor | np.ndarray:
        """Embed ``inputs`` (strings or ``(instruction, text)`` pairs): float32 [len(inputs), hidden];
        one string gives one vector [hidden], as sentence-transformers does.

        ``normalize``: L2-normalise the rows (default: the stored default, set by a sentence-
        transformers ``Normalize`` module). ``prompt`` / ``prompt_name``: prepended to every text
        (a named prompt stored at conversion; the stored default prompt when neither is given).
        Inputs are sorted by token count (longest first) and encoded as packed batches of at most
        ``batch_size`` inputs and ``max_batch_tokens`` tokens (an input longer than the budget goes
        alone), which bounds memory; rows come back in input order, and no embedding depends on its
        batch neighbours.
        """
        normalize = self.config.normalize if normalize is None else normalize
        for name, value in (("normalize", normalize), ("show_progress_bar", show_progress_bar),
                            ("convert_to_numpy", convert_to_numpy)):
            _check_bool(name, value)
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        single = isinstance(inputs, str)
        items = self.tokenize([inputs] if single else inputs, prompt=prompt, prompt_name=prompt_name)
        out = torch.empty((len(items), self.hidden_size), dtype=torch.float32)
        batches = plan_batches([t.num_tokens for t in items], batch_size, max_batch_tokens)
        with tqdm(total=len(items), desc="encode", unit="input", disable=not show_progress_bar) as bar:
            # One batch in flight: batch k + 1 is packed and queued before batch k's rows are awaited.
            pending: tuple[list[int], _PendingRows] | None = None
            for chunk in [*batches, None]:
                launched = None if chunk is None else (chunk, self._launch([items[i] for i in chunk], normalize))
                if pending is not None:
                    done_chunk, rows = pending
                    out[torch.tensor(done_chunk)] = rows.result()
                    bar.update(len(done_chunk))
                pending = launched
        if single:
            out = out[0]
        return out.numpy() if convert_to_numpy else out

    def warmup(self, max_batch_tokens: int = 16384) -> list[int]:
        """Make the first request as fast as the next ones; returns the lengths of the forwards run.

        With Triton kernels: one forward per sequence-length bucket this engine can see (powers of two
        up to ``max_length``; the attention autotuner keys on them), so that every compilation and
        autotune happens now, and, with ``cuda_graphs``, the graph of every bucket shape is captured.
        Otherwise (the CPU and reference backends compile nothing) one short forward, which touches the
        weights and the allocator: sweeping to a 32k max length on a CPU would take many minutes."""
        if self.model.ops.name == "triton":
            lengths = sorted({min(self.max_length, 1 << p) for p in range(4, max(5, self.max_length.bit_length() + 1))})
        else:
            lengths = [min(self.max_length, 16)]
        if self._buckets is not None:
            self._buckets.capture_all(self.max_length)  # largest first, so the graphs share memory best
        vocab = self.config.model.vocab_size
        for length in lengths:
            n = max(1, min(4, max_batch_tokens // length))
            ids = [[(7 + 31 * i + j) % vocab for j in range(length)] for i in range(n)]
            self.embed_tokenized([TokenizedExample(row, 0, length) for row in ids])
        return lengths


class _PendingRows:
    """Pooled rows being copied to the host; ``result()`` waits for the copy (CUDA) and returns them."""

    def __init__(self, rows: torch.Tensor, done: "torch.cuda.Event | None") -> None:
        self._rows, self._done = rows, done

    def result(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        return self._rows


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches, longest inputs first, each batch holding at most
    ``batch_size`` inputs and ``max_batch_tokens`` tokens (a single longer input forms its own batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    tokens = 0
    for i in order:
        if batches and len(batches[-1]) < batch_size and tokens + lengths[i] <= max_batch_tokens:
            batches[-1].append(i)
            tokens += lengths[i]
        else:
            batches.append([i])
            tokens = lengths[i]
    return batches


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _load_tokenizer(path: Path, vocab_size: int) -> Any:
    """The directory's fast tokenizer; FormatError for a missing, corrupt or oversized one."""
    from transformers import AutoTokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        raise FormatError(f"{file}: missing (the engine needs a fast tokenizer for offsets)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # tokenizers and transformers raise many types for a damaged file
        raise FormatError(f"{file}: cannot load the tokenizer ({' '.join(str(exc).split())[:200]})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise FormatError(f"{path}: the tokenizer must be a fast tokenizer (tokenizer.json) to give offsets")
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= vocab_size:
        raise FormatError(f"{file}: token id {top} is outside the model's vocabulary of {vocab_size}")
    return tokenizer


def _resolve_dtype(dtype: torch.dtype | str | None, stored: str, device: torch.device) -> torch.dtype:
    if dtype == _AUTO:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype is None:
        return DTYPES[stored]
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype={dtype!r}: expected torch.float32, torch.float16 or torch.bfloat16")
    return dtype
