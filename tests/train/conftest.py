"""Shared pieces of the training tests: tiny checkpoints, small learnable corpora, the transformers +
peft reference for embeddings."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from _hf_reference import hf_embeddings

from converters.tiny_models import _WORDS, sample_sentences, save_tiny_checkpoint

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
INSTRUCTION = "Retrieve the sentence with the same words"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: threads only add synchronisation (and the CI machine has 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cyclic_sentences(n: int, seed: int) -> list[str]:
    """Runs of consecutive words from a fixed cycle of 24: a masked word is predictable from its
    neighbours, so MNTP has something to learn."""
    words = _WORDS[:24]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(words)), rng.randint(6, 14)
        out.append(" ".join(words[(start + i) % len(words)] for i in range(length)))
    return out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pairs(path: Path, sentences: list[str], seed: int) -> Path:
    """Query: a sentence (with an instruction); positive: the same words shuffled; negative: another sentence."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(sentences):
            words = text.split()
            rng.shuffle(words)
            f.write(json.dumps({"query": text, "positive": " ".join(words),
                                "negative": sentences[(i + 7) % len(sentences)], "instruction": INSTRUCTION}) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    sentences = sample_sentences(240, seed=9)
    return {
        "mntp": write_lines(root / "mntp.txt", cyclic_sentences(300, seed=0)),
        "mntp_eval": write_lines(root / "mntp_eval.txt", cyclic_sentences(40, seed=1)),
        "simcse": write_lines(root / "simcse.txt", sample_sentences(200, seed=5)),
        "simcse_eval": write_lines(root / "simcse_eval.txt", sample_sentences(40, seed=6)),
        "pairs": write_pairs(root / "pairs.jsonl", sentences[:200], seed=0),
        "pairs_eval": write_pairs(root / "pairs_eval.jsonl", sentences[200:], seed=1),
    }


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("llama") / "hf", "llama", seed=1, **TINY)


def eval_losses(out: Path) -> list[float]:
    return [r["eval_loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_loss" in r]


def peft_model(src: Path, adapters: list[Path]):
    """transformers' model with ``adapters[:-1]`` merged (as LLM2Vec does with the MNTP adapter) and
    the last one loaded by peft, unmerged. Asserts peft finds every key of the last adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    for adapter in adapters[:-1]:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(adapters[-1]))
    check = model.load_adapter(str(adapters[-1]), adapter_name="check")
    assert not check.missing_keys and not check.unexpected_keys, check
    model.set_adapter("default")
    return model.eval()


def reference_embeddings(src: Path, adapters: list[Path], inputs: list, max_length: int) -> torch.Tensor:
    """float64 mean-pooled embeddings from transformers + peft (see ``peft_model``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    decoder = peft_model(src, adapters).get_base_model().model
    return hf_embeddings(decoder, tokenizer, inputs, "mean", max_length)
