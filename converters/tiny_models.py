"""Tiny random Hugging Face checkpoints, tokenizers, PEFT LoRA adapters and sentence-transformers
directories, built locally.

No model hub is reachable from our machines, so the demo, the tests and the CPU benchmarks build
their own: a transformers model class with random weights saved as sharded safetensors, a BPE
tokenizer trained in about a second, adapters saved by ``peft`` itself and sentence-transformers
directories saved by the ``sentence-transformers`` package.

``FAMILY_VARIANTS`` holds the shapes of the released families that differ from the plain family
defaults (Gemma-2's soft-capping and extra norms, Qwen3's q/k norms, Mistral-NeMo's head_dim,
Llama-3.2's tied embeddings and rope scaling), scaled down.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
# Families whose RMSNorm scales by (1 + weight): their random norm weights are centred on 0.
_OFFSET_NORM_FAMILIES = ("gemma", "gemma2")
TOKENIZER_STYLES = ("metaspace_bos", "byte_level", "byte_level_bos", "byte_level_eos")
# name -> (family, save_tiny_checkpoint keyword arguments): the released families' peculiarities, tiny.
FAMILY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Gemma-2: head_dim independent of hidden / heads, query_pre_attn_scalar != head_dim, soft-caps
    # small enough to change the result of random weights, a window shorter than the test inputs
    # on the even (sliding) layers, four norms per layer.
    "gemma2": ("gemma2", dict(head_dim=32, extra_config=dict(
        query_pre_attn_scalar=24, attn_logit_softcapping=1.5, final_logit_softcapping=3.0, sliding_window=4))),
    # Qwen3: q/k RMSNorm over each head; head_dim given explicitly, as the released configs do.
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
    # Mistral-NeMo: head_dim 32 with hidden 64 and 4 heads (q_size 128 != hidden).
    "mistral_nemo": ("mistral", dict(head_dim=32, extra_config=dict(sliding_window=None))),
    # Llama-3.2: tied embeddings, llama3 rope scaling (short original context: every band is used),
    # a byte-level tokenizer that prepends BOS.
    "llama32": ("llama", dict(tie_word_embeddings=True, tokenizer_style="byte_level_bos", rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_WORDS = (
    "the a an of to in for on with by from about query passage document answer question retrieve find "
    "relevant scientific claim paper model language text encoder embedding vector search engine river "
    "mountain city music history science data kernel memory fast slow large small quick brown fox jumps "
    "over lazy dog weather today tomorrow bank money account loan interest rate red green blue light "
    "water fire earth wind computer network protocol server client request response graph attention"
).split()


def sample_sentences(n: int, seed: int = 0, min_words: int = 3, max_words: int = 16) -> list[str]:
    """``n`` random sentences over a fixed vocabulary (a stand-in corpus for tokenizers and demos)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    return out


def train_tokenizer(out_dir: str | Path, family: str, vocab_size: int = 384, style: str | None = None) -> Any:
    """Train a small BPE fast tokenizer shaped like ``family``'s and save it to ``out_dir``.

    ``style`` (default by family): ``metaspace_bos``, a SentencePiece-like tokenizer that prepends BOS
    (Llama 2, Mistral, Gemma); ``byte_level``, no special token added (Qwen2, Qwen3);
    ``byte_level_bos``, BOS prepended (Llama 3); ``byte_level_eos``, EOS appended by the
    post-processor (Qwen3-Embedding, gte-Qwen2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style is None:
        style = "byte_level" if family in ("qwen2", "qwen3") else "metaspace_bos"
    if style not in TOKENIZER_STYLES:
        raise ValueError(f"tokenizer style {style!r} is not one of {TOKENIZER_STYLES}")
    byte_level = style.startswith("byte_level")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(sample_sentences(2000, seed=1) + [" ".join(_WORDS)], trainer)
    if style == "byte_level":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif style == "byte_level_eos":
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
        )
    else:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(str(out_dir))
    return fast


def save_tiny_checkpoint(
    out_dir: str | Path,
    family: str,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int = 384,
    max_shard_size: str = "60KB",
    seed: int = 0,
    rope_scaling: dict[str, Any] | None = None,
    tie_word_embeddings: bool | None = None,
    bare_model: bool = False,
    dtype: torch.dtype = torch.float32,
    extra_config: dict[str, Any] | None = None,
    tokenizer_style: str | None = None,
) -> Path:
    """Save a random ``family`` checkpoint (sharded safetensors + trained tokenizer) to ``out_dir``.

    Every weight is random, norm weights included (Gemma-2's four per layer, Qwen3's q/k norms), so
    that parity tests see every parameter's effect. ``bare_model`` saves the ``*Model`` class (no LM
    head) instead of ``*ForCausalLM``. ``head_dim`` None keeps the config class's default (hidden /
    heads for most; Gemma, Gemma-2 and Qwen3 have fixed defaults). ``extra_config``: further config
    fields (soft-caps, sliding windows, ``is_causal``...). ``tokenizer_style``: see
    :func:`train_tokenizer`.
    """
    import transformers

    out_dir = Path(out_dir)
    config_cls_name, model_cls_name = FAMILY_CLASSES[family]
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if tie_word_embeddings is not None:
        kwargs["tie_word_embeddings"] = tie_word_embeddings
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
        kwargs["rope_theta"] = 500000.0
    kwargs.update(extra_config or {})
    config = getattr(transformers, config_cls_name)(**kwargs)
    model_cls = getattr(transformers, model_cls_name.replace("ForCausalLM", "Model") if bare_model else model_cls_name)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                base = 0.0 if family in _OFFSET_NORM_FAMILIES else 1.0
                param.copy_(base + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    model.to(dtype).save_pretrained(str(out_dir), max_shard_size=max_shard_size, safe_serialization=True)
    train_tokenizer(out_dir, family, vocab_size=vocab_size, style=tokenizer_style)
    return out_dir


def save_lora_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int = 4,
    alpha: int = 8,
    seed: int = 0,
    target_modules: list[str] | None = None,
    use_rslora: bool = False,
    scale: float = 0.05,
) -> Path:
    """Save a PEFT LoRA adapter for the checkpoint in ``model_dir`` with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules or LORA_TARGETS,
        use_rslora=use_rslora,
        bias="none",
    )
    model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def save_tiny_sentence_transformer(
    out_dir: str | Path,
    family: str,
    *,
    pooling_mode: str = "lasttoken",
    include_prompt: bool = True,
    normalize: bool = True,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    max_seq_length: int | None = None,
    **checkpoint: Any,
) -> Path:
    """Save a sentence-transformers directory (Transformer + Pooling [+ Normalize]) written by the
    ``sentence-transformers`` package itself, around a random ``family`` checkpoint
    (``checkpoint``: :func:`save_tiny_checkpoint` options, e.g. ``tokenizer_style``). Needs
    sentence-transformers 6 (its module paths); the directories it writes are read by every version."""
    import tempfile

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    with tempfile.TemporaryDirectory(prefix="tiny-st-") as tmp:
        hf = save_tiny_checkpoint(Path(tmp) / "hf", family, **checkpoint)
        transformer = Transformer(str(hf), max_seq_length=max_seq_length)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode, include_prompt=include_prompt)
        modules = [transformer, pooling] + ([Normalize()] if normalize else [])
        model = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt_name,
                                    device="cpu")
        model.save(str(out_dir))
    return Path(out_dir)
