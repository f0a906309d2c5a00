"""The public :class:`Engine`: load a converted checkpoint, ``encode`` texts into embeddings."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .backends import default_backend, get_ops
from .batch import pack
from .format import DTYPES, ENCODE_POOLING, EngineConfig, FormatError, load_state_dict
from .inputs import parse_inputs, pooling_spans, tokenize
from .model import EncoderModel

_AUTO = "auto"


class Engine:
    """A bidirectional LLM encoder ready to embed text.

    Use :meth:`from_pretrained` on a directory written by ``python -m converters.hf2engine``.
    """

    def __init__(self, model: EncoderModel, tokenizer: Any, config: EngineConfig, pooling: str, max_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.pooling = pooling
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = _AUTO,
        pooling: str | None = None,
        max_length: int | None = None,
        backend: str | None = None,
    ) -> "Engine":
        """Load an engine directory.

        ``dtype``: the compute dtype; by default float32 on CPU and bfloat16 on CUDA; ``None`` keeps the
        stored dtype. ``pooling`` and ``max_length`` override the defaults stored at conversion.
        ``backend``: ``"reference"`` (plain PyTorch) or ``"triton"`` (fused kernels); by default
        ``triton`` on CUDA and ``reference`` elsewhere.
        """
        path = Path(path)
        config = EngineConfig.read(path)
        device = torch.device(device)
        dtype = _resolve_dtype(dtype, config.dtype, device)
        pooling = config.pooling if pooling is None else pooling
        if pooling not in ENCODE_POOLING:
            raise ValueError(f"pooling={pooling!r}: expected one of {ENCODE_POOLING}")
        max_length = config.max_length if max_length is None else max_length
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length={max_length!r}: expected a positive integer")
        ops = get_ops(default_backend(device) if backend is None else backend, device)

        # Build on the meta device (no allocation), then adopt the stored tensors as parameters.
        with torch.device("meta"):
            model = EncoderModel(config.model, with_lm_head=config.has_lm_head)
        state = load_state_dict(path, device, dtype)
        expected = set(model.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise FormatError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {extra[:3]})")
        model.load_state_dict(state, assign=True)
        # The weights are cast already; .to() also recomputes the rotary frequencies off the meta device.
        model.to(dtype=dtype).eval().requires_grad_(False)
        model.ops = ops
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if not tokenizer.is_fast:
            raise FormatError(f"{path}: the tokenizer must be a fast tokenizer (tokenizer.json) to give offsets")
        return cls(model, tokenizer, config, pooling, max_length)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def hidden_size(self) -> int:
        return self.config.model.hidden_size

    @torch.inference_mode()
    def encode(
        self,
        inputs: Sequence[str | tuple[str, str] | list[str]],
        normalize: bool = False,
        batch_size: int = 64,
        show_progress_bar: bool = False,
        convert_to_numpy: bool = False,
        max_batch_tokens: int = 16384,
    ) -> torch.Tensor | np.ndarray:
        """Embed ``inputs`` (strings or ``(instruction, text)`` pairs): float32 [len(inputs), hidden].

        Inputs are sorted by token count (longest first) and encoded as packed batches of at most
        ``batch_size`` inputs and ``max_batch_tokens`` tokens (an input longer than the budget goes
        alone), which bounds memory; rows come back in input order, and no embedding depends on its
        batch neighbours.
        """
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        examples = parse_inputs(inputs)
        out = torch.empty((len(examples), self.hidden_size), dtype=torch.float32)
        tokenized = tokenize(self.tokenizer, examples, self.max_length, require_text=self.pooling in ("mean", "weighted_mean"))
        chunks = plan_batches([len(t.input_ids) for t in tokenized], batch_size, max_batch_tokens)
        for chunk in tqdm(chunks, desc="encode", unit="batch", disable=not show_progress_bar):
            items = [tokenized[i] for i in chunk]
            batch = pack([t.input_ids for t in items], self.device)
            x, residual = self.model.hidden_before_norm(batch)
            starts, ends, mode = pooling_spans(items, batch, self.pooling)
            cfg, ops = self.config.model, self.model.ops
            # The final residual add and norm are fused into pooling: only pooled rows are normed.
            pooled = ops.norm_pool(x, residual, self.model.norm, cfg.rms_norm_eps, cfg.norm_weight_offset,
                                   starts, ends, mode, normalize)
            out[torch.tensor(chunk)] = pooled.float().cpu()
        return out.numpy() if convert_to_numpy else out


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

