"""The benchmark models and the systems compared on them, plus the FLOP count.

One random checkpoint per setup (Mistral-family for the encode suite, Qwen2-family for the CPU fast
path) is saved with ``converters.tiny_models.save_tiny_checkpoint`` and converted with
``converters.convert.convert``; every system loads its weights from those two directories, so all
of them run the same shapes and the same weights:

- ``engine_triton``: ``Engine(backend="triton")``, the fast path (CUDA only);
- ``engine_cpu``: ``Engine(backend="cpu")``, the CPU path (CPU only);
- ``engine_reference``: ``Engine(backend="reference")``, the plain-PyTorch path;
- ``transformers``: ``AutoModel`` with SDPA attention, run the way LLM2Vec runs it (see
  :class:`TransformersEncoder`).

:func:`matmul_peak_gflops` measures the ceiling the CPU fast path is judged against: the model's own
four matrix products of one layer, at the batch's token count, in the same run.

FLOPs (:func:`encode_flops`) count useful work only, on the real tokens of each input: per token,
``2 * P`` for the matrix products (``P`` = the non-embedding matrix parameters, per layer
``hidden * (q + 2 kv) + q * hidden + 3 * hidden * intermediate``) plus, per layer,
``4 * L * heads * head_dim`` for attention (``Q K^T`` and ``P V``, each ``2 * L * head_dim`` per head,
over all ``L`` keys of the token's own sequence: attention is bidirectional). Padding that a system
computes is not counted, so padding waste shows up as lower utilisation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

MISTRAL_7B = dict(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32000)
# A small model with Mistral's proportions (GQA 4:1, MLP 3.5x) for the CPU suite.
CPU_SMALL = dict(hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=896, vocab_size=32000)
# Qwen2-0.5B's proportions (q/k/v bias, GQA 7:1, MLP 5.4x) with a 32k vocabulary: the CPU fast path's model.
QWEN2_05B = dict(hidden_size=896, num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864, vocab_size=32000)
CPU_FAST_LEN, CPU_FAST_INPUTS = 128, 16  # the CPU fast-path corpus: 16 inputs of 128 tokens, one batch
FULL_LAYERS = 32  # Mistral-7B's depth, for the per-layer scaling
PEAK_TFLOPS = float(os.environ.get("BENCH_PEAK_TFLOPS", "800"))  # measured bf16 matmul ceiling of the lent H100
BATCH_SIZE = 32  # LLM2Vec's default encode batch size; the engine gets the same number of inputs per batch
SYSTEMS = ("engine_triton", "engine_cpu", "engine_reference", "transformers")


@dataclass(frozen=True)
class BenchSetup:
    """What the session benchmarks: device, dtype, model shape, layer count, corpus lengths, rounds."""

    device: torch.device
    dtype: torch.dtype
    shape_name: str
    shape: dict
    layers: int
    long_len: int
    rounds: int
    warmup_rounds: int
    family: str = "mistral"

    @classmethod
    def cpu_fast_path(cls) -> "BenchSetup":
        """The CPU fast-path benchmark: the Qwen2-0.5B shape in bfloat16 on the CPU, ``BENCH_CPU_LAYERS``
        layers (default 2), ``BENCH_ROUNDS`` rounds (default 3)."""
        return cls(
            device=torch.device("cpu"), dtype=torch.bfloat16, shape_name="Qwen2-0.5B shape", shape=QWEN2_05B,
            layers=int(os.environ.get("BENCH_CPU_LAYERS", "2")), long_len=CPU_FAST_LEN,
            rounds=int(os.environ.get("BENCH_ROUNDS", "3")), warmup_rounds=1, family="qwen2",
        )

    @classmethod
    def from_env(cls) -> "BenchSetup":
        """``BENCH_DEVICE`` (default ``cuda`` when available, else ``cpu``), ``BENCH_LAYERS`` (default 4 on
        CUDA, 2 on CPU), ``BENCH_LONG_LEN`` (default 512 on CUDA, 128 on CPU), ``BENCH_ROUNDS``."""
        device = torch.device(os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = device.type == "cuda"
        return cls(
            device=device,
            dtype=torch.bfloat16 if cuda else torch.float32,
            shape_name="Mistral-7B shape" if cuda else "small Mistral shape",
            shape=MISTRAL_7B if cuda else CPU_SMALL,
            layers=int(os.environ.get("BENCH_LAYERS", "4" if cuda else "2")),
            long_len=int(os.environ.get("BENCH_LONG_LEN", "512" if cuda else "128")),
            rounds=int(os.environ.get("BENCH_ROUNDS", "5")),
            warmup_rounds=2 if cuda else 1,
        )

    def describe(self) -> str:
        s = self.shape
        return (
            f"{self.shape_name}: hidden {s['hidden_size']}, {s['num_heads']} heads, {s['num_kv_heads']} kv heads, "
            f"head_dim {s['head_dim']}, intermediate {s['intermediate_size']}, vocab {s['vocab_size']}, "
            f"{self.layers} layers, {str(self.dtype).removeprefix('torch.')}, random weights, on {self.device}"
        )

    def matmul_params_per_layer(self) -> int:
        return matmul_params_per_layer(self.shape)

    def encode_flops(self, lengths: Sequence[int], layers: int | None = None) -> float:
        """Useful FLOPs to encode sequences of these token counts (see the module docstring)."""
        return encode_flops(self.shape, self.layers if layers is None else layers, lengths)


def matmul_params_per_layer(shape: dict) -> int:
    """Matrix parameters of one layer of a model of ``shape`` (a dict like :data:`MISTRAL_7B`)."""
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    return shape["hidden_size"] * (q + 2 * kv) + q * shape["hidden_size"] + 3 * shape["hidden_size"] * shape["intermediate_size"]


def encode_flops(shape: dict, layers: int, lengths: Sequence[int]) -> float:
    """Useful FLOPs to encode sequences of these token counts (see the module docstring)."""
    per_layer_matmul = 2 * matmul_params_per_layer(shape)
    attn = 4 * shape["num_heads"] * shape["head_dim"]
    return float(layers * sum(n * per_layer_matmul + attn * n * n for n in lengths))


def matmul_peak_gflops(shape: dict, tokens: int, dtype: torch.dtype, reps: int = 2) -> float:
    """GFLOP/s of one layer's four matrix products of a model of ``shape`` (q/k/v, output, gate/up, down)
    at ``tokens`` rows, random operands on the CPU, the best of ``reps`` timings. The outputs are
    allocated once, so the figure is the BLAS's, not the allocator's."""
    import time

    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(tokens, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype).t(),
              torch.empty(tokens, n, dtype=dtype)) for n, k in ((q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter))]
    for x, w, out in cases:  # warm: the BLAS picks its kernels, the pages are touched
        torch.mm(x, w, out=out)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for x, w, out in cases:
            torch.mm(x, w, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * tokens * matmul_params_per_layer(shape) / best / 1e9


def build_checkpoints(setup: BenchSetup, root: Path) -> tuple[Path, Path]:
    """Save the random Hugging Face checkpoint and convert it: ``(hf_dir, engine_dir)``.

    With ``BENCH_CACHE_DIR`` set, the directories are kept there (keyed by shape, layers and dtype) and
    reused by later sessions.
    """
    from converters.convert import convert
    from converters.tiny_models import save_tiny_checkpoint

    cache = os.environ.get("BENCH_CACHE_DIR")
    if cache:
        s = setup.shape
        key = f"{setup.family}-h{s['hidden_size']}-i{s['intermediate_size']}-l{setup.layers}-{str(setup.dtype).removeprefix('torch.')}"
        root = Path(cache) / key
    hf_dir, engine_dir = root / "hf", root / "engine"
    if not (hf_dir / "config.json").is_file():
        save_tiny_checkpoint(
            hf_dir,
            setup.family,
            num_layers=setup.layers,
            max_shard_size="2GB",
            bare_model=True,
            dtype=setup.dtype,
            **setup.shape,
        )
    if not (engine_dir / "engine_config.json").is_file():
        convert(hf_dir, engine_dir, dtype=str(setup.dtype).removeprefix("torch."), quiet=True, force=True)
    return hf_dir, engine_dir


def load_engine(engine_dir: Path, setup: BenchSetup, backend: str, dtype: torch.dtype | None = None):
    from engine import Engine

    return Engine.from_pretrained(engine_dir, device=setup.device, dtype=dtype or setup.dtype, backend=backend)


def bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 0/1 padding mask -> additive [B, 1, L, L]: 0 for real keys, ``finfo.min`` for padding keys.

    Every query row (padding rows included) sees all real keys of its sequence, so no row is empty.
    """
    b, n = attention_mask.shape
    mask = torch.zeros(b, 1, n, n, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill_(attention_mask[:, None, None, :] == 0, torch.finfo(dtype).min)


class TransformersEncoder:
    """transformers run the way LLM2Vec encodes: inputs sorted by length, longest first (LLM2Vec sorts by
    character count, as sentence-transformers does), batches of 32, left padding, an explicit 4-D
    bidirectional mask (a 2-D mask would make the model causal), mean pooling over the attention
    mask. Like LLM2Vec it passes no position ids, so left-padded rows start at a later position;
    rotary attention depends only on position differences, so the result is the same.
    """

    def __init__(self, model, tokenizer, device: torch.device, dtype: torch.dtype, max_length: int = 512) -> None:
        self.device, self.dtype, self.max_length = device, dtype, max_length
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.model = model.eval().requires_grad_(False)
        self.hidden_size = self.model.config.hidden_size
        self.padded_tokens = 0  # tokens computed by the last encode call, padding included

    @classmethod
    def from_dir(cls, hf_dir: Path, setup: BenchSetup, max_length: int = 512) -> "TransformersEncoder":
        """``AutoModel`` with SDPA attention from a saved checkpoint."""
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(str(hf_dir), dtype=setup.dtype, attn_implementation="sdpa").to(setup.device)
        return cls(model, AutoTokenizer.from_pretrained(str(hf_dir)), setup.device, setup.dtype, max_length)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = BATCH_SIZE, skip_bos: bool = False) -> torch.Tensor:
        """float32 [len(texts), hidden] in input order. ``skip_bos`` leaves each input's first token out
        of the mean (the engine's pooling of a plain text; used only by the agreement check)."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.hidden_size, dtype=torch.float32)
        self.padded_tokens = 0
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in chunk], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            keep = enc["attention_mask"]
            self.padded_tokens += keep.numel()
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=bidirectional_mask(keep, self.dtype)).last_hidden_state
            if skip_bos:
                # Left padding: the first real token sits right after the padding.
                first = keep.shape[1] - keep.sum(1)
                keep = keep.clone()
                keep[torch.arange(keep.shape[0], device=keep.device), first] = 0
            weights = keep.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
            out[torch.tensor(chunk)] = pooled.float().cpu()
        return out


def transformers_sharing_weights(engine_model, hf_config, attn_implementation: str = "sdpa"):
    """The transformers ``*Model`` of ``hf_config`` whose parameters are views of ``engine_model``'s (the
    fused q/k/v and gate/up rows split back): the same weights with no copy, for a side-by-side run of
    a model that exists only in memory. Llama-layout families (Llama, Mistral, Qwen2) only."""
    from torch import nn
    from transformers import AutoModel

    with torch.device("meta"):
        hf = AutoModel.from_config(hf_config, attn_implementation=attn_implementation)
    cfg = engine_model.cfg
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size

    def share(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        setattr(module, name, nn.Parameter(tensor, requires_grad=False))

    share(hf.embed_tokens, "weight", engine_model.embed.weight)
    share(hf.norm, "weight", engine_model.norm)
    for ours, theirs in zip(engine_model.layers, hf.layers):
        attn, mlp = theirs.self_attn, theirs.mlp
        share(theirs.input_layernorm, "weight", ours.attn_norm)
        share(theirs.post_attention_layernorm, "weight", ours.mlp_norm)
        for proj, rows in ((attn.q_proj, slice(0, q)), (attn.k_proj, slice(q, q + kv)), (attn.v_proj, slice(q + kv, q + 2 * kv))):
            share(proj, "weight", ours.qkv.weight[rows])
            if ours.qkv.bias is not None:
                share(proj, "bias", ours.qkv.bias[rows])
        share(attn.o_proj, "weight", ours.o.weight)
        share(mlp.gate_proj, "weight", ours.gate_up.weight[:inter])
        share(mlp.up_proj, "weight", ours.gate_up.weight[inter:])
        share(mlp.down_proj, "weight", ours.down.weight)
    device = engine_model.embed.weight.device
    with torch.device("cpu"):  # its buffers, computed off the meta device (the signature varies by version)
        hf.rotary_emb = type(hf.rotary_emb)(hf.config).to(device)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensors of the transformers model not shared with the engine model: {left[:5]}")
    return hf.eval()
