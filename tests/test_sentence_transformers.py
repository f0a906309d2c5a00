"""sentence-transformers directories: converted with their own defaults, the engine matches
``SentenceTransformer(dir).encode(..., prompt_name=...)`` itself within 1e-4.

Two tiny directories saved by the sentence-transformers package: a Qwen3-Embedding-like one (causal,
a tokenizer that appends EOS, Pooling(lasttoken) + Normalize, an instruction prompt) and a
bidirectional Llama-3.2 one (``is_causal: false`` in its config, as gte-Qwen2 has; a byte-level
tokenizer that prepends BOS; mean pooling with ``include_prompt=False``, a default prompt). The
layouts older versions wrote are built from them, checked to load in sentence-transformers, and
converted too. Where the engine's include_prompt=False rule and sentence-transformers' token count
differ, the tests pin the difference down against sentence-transformers' own token embeddings.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from sentence_transformers import SentenceTransformer

from converters.convert import convert
from converters.hf2engine import main
from converters.sources import ConversionError
from converters.tiny_models import FAMILY_VARIANTS, save_tiny_sentence_transformer
from engine import Engine
from engine.format import EngineConfig

QUERY = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "river",
    "what is a kernel in a language model? " * 6,  # longer than max_seq_length: truncated
    "Bank loan interest rate today!",
]


def _variant(name: str, **extra) -> dict:
    kwargs = dict(FAMILY_VARIANTS[name][1])
    kwargs.update(extra)
    return kwargs


@pytest.fixture(scope="module")
def st_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    last = save_tiny_sentence_transformer(
        root / "qwen3-last", "qwen3", pooling_mode="lasttoken", normalize=True, prompts={"query": QUERY},
        max_seq_length=40, **_variant("qwen3", tokenizer_style="byte_level_eos", seed=5))
    mean = save_tiny_sentence_transformer(
        root / "llama-mean", "llama", pooling_mode="mean", include_prompt=False, normalize=False,
        prompts={"query": "query:", "passage": "passage:"}, default_prompt_name="passage", max_seq_length=32,
        **_variant("llama32", extra_config={"is_causal": False}, seed=6))
    return {"last": last, "mean": mean}


@pytest.fixture(scope="module")
def converted(st_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("st-engines")
    return {name: convert(path, root / name, quiet=True) for name, path in st_dirs.items()}


def assert_rel_close(actual, expected, tol=1e-4):
    expected = torch.as_tensor(expected).double()
    err = (torch.as_tensor(actual).double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert err.max() <= tol, f"max relative error {err.max():.3e} > {tol:.0e}: {err.tolist()}"


def test_settings_come_from_the_directory(st_dirs, converted):
    last, mean = EngineConfig.read(converted["last"]), EngineConfig.read(converted["mean"])
    assert (last.pooling, last.include_prompt, last.normalize, last.max_length) == ("last_token", True, True, 40)
    assert last.model.attention == "causal" and last.model.qk_norm  # a decoder directory is causal by default
    assert last.prompts["query"] == QUERY and last.default_prompt_name is None
    assert (mean.pooling, mean.include_prompt, mean.normalize, mean.max_length) == ("mean", False, False, 32)
    assert mean.model.attention == "bidirectional"  # its config.json says is_causal: false
    assert mean.prompts["passage"] == "passage:" and mean.default_prompt_name == "passage"
    assert not last.append_eos and not mean.append_eos
    recorded = last.sources["sentence_transformers"]
    assert recorded["path"] == str(st_dirs["last"].resolve())
    assert {"modules.json", "1_Pooling/config.json", "2_Normalize/config.json", "sentence_bert_config.json",
            "config_sentence_transformers.json"} <= set(recorded["files"])


def test_prompts_chosen_do_not_merge_with_the_text(st_dirs):
    """The parity below holds because each prompt's tokens are a prefix of the tokens of prompt + text
    (a colon or a newline ends them): sentence-transformers excludes exactly that many tokens."""
    for name, prompts in (("last", [QUERY]), ("mean", ["query:", "passage:"])):
        tokenizer = SentenceTransformer(str(st_dirs[name]), device="cpu").tokenizer
        for prompt in prompts:
            alone = tokenizer(prompt)["input_ids"]
            alone = alone[:-1] if alone[-1] == tokenizer.eos_token_id else alone
            for text in TEXTS:
                assert tokenizer(prompt + text)["input_ids"][: len(alone)] == alone


@pytest.mark.parametrize("name, prompt_name", [("last", "query"), ("last", None), ("mean", "query"), ("mean", None)])
def test_encode_matches_sentence_transformers(st_dirs, converted, name, prompt_name):
    """``None``: no prompt for the first directory, its default prompt ("passage") for the second."""
    reference = SentenceTransformer(str(st_dirs[name]), device="cpu")
    expected = reference.encode(TEXTS, prompt_name=prompt_name, batch_size=2, convert_to_tensor=True)
    engine = Engine.from_pretrained(converted[name])
    actual = engine.encode(TEXTS, prompt_name=prompt_name, batch_size=3)
    assert_rel_close(actual, expected)
    if name == "last":
        torch.testing.assert_close(actual.norm(dim=-1), torch.ones(len(TEXTS)))  # the Normalize module


def test_without_a_prompt_bos_is_pooled_by_st_only(st_dirs, converted):
    """include_prompt=False with no prompt at all: sentence-transformers excludes nothing and pools
    the BOS token; the engine pools the text's own tokens, never a special token (documented)."""
    reference = SentenceTransformer(str(st_dirs["mean"]), device="cpu")
    tokens = reference.encode(TEXTS, prompt="", output_value="token_embeddings")
    sentence = reference.encode(TEXTS, prompt="", convert_to_tensor=True)
    assert_rel_close(sentence, torch.stack([t.mean(0) for t in tokens]), 1e-5)
    ours = Engine.from_pretrained(converted["mean"]).encode(TEXTS, prompt="")
    assert_rel_close(ours, torch.stack([t[1:].mean(0) for t in tokens]))  # token 0 is BOS


def test_a_prompt_merging_with_the_text_is_counted_differently(st_dirs, converted):
    """"query: " ends in a space that the byte-level tokenizer attaches to the text's first word when
    their merge exists ("Ġthe"): then the prompt alone has one more token than inside prompt + text,
    and sentence-transformers also drops the text's first token, while the engine follows the offsets
    of what the model read. Without the merge both pool the same tokens."""
    reference = SentenceTransformer(str(st_dirs["mean"]), device="cpu")
    prompt = "query: "
    alone = reference.tokenizer(prompt)["input_ids"]
    merged = [reference.tokenizer(prompt + t)["input_ids"][: len(alone)] != alone for t in TEXTS]
    assert any(merged) and not all(merged)
    tokens = reference.encode(TEXTS, prompt=prompt, output_value="token_embeddings")
    sentence = reference.encode(TEXTS, prompt=prompt, convert_to_tensor=True)
    assert_rel_close(sentence, torch.stack([t[len(alone):].mean(0) for t in tokens]), 1e-5)
    ours = Engine.from_pretrained(converted["mean"]).encode(TEXTS, prompt=prompt)
    assert_rel_close(ours, torch.stack([t[len(alone) - m :].mean(0) for t, m in zip(tokens, merged)]))


def test_append_eos_never_adds_a_second_one(st_dirs, converted, tmp_path):
    """The Qwen3-like tokenizer appends EOS itself: --append-eos adds nothing, truncation keeps its EOS."""
    engine = Engine.from_pretrained(convert(st_dirs["last"], tmp_path / "eos", append_eos=True, quiet=True))
    assert engine.config.append_eos
    eos = engine.tokenizer.eos_token_id
    items = engine.tokenize(TEXTS, prompt_name="query")
    assert all(t.input_ids[-1] == eos and t.input_ids.count(eos) == 1 for t in items)
    assert items[2].num_tokens == 40
    plain = Engine.from_pretrained(converted["last"])
    assert [t.input_ids for t in plain.tokenize(TEXTS, prompt_name="query")] == [t.input_ids for t in items]
    expected = SentenceTransformer(str(st_dirs["last"]), device="cpu").encode(TEXTS, prompt_name="query",
                                                                               convert_to_tensor=True)
    assert_rel_close(engine.encode(TEXTS, prompt_name="query"), expected)


def _write(path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


def _old_layout(src, dst, subfolder: bool):
    """``src`` rewritten as sentence-transformers 2.x-5.x wrote it: module paths as types, pooling_mode_*
    flags, max_seq_length in sentence_bert_config.json (no model_max_length in the tokenizer config),
    an empty Normalize folder; with ``subfolder`` the transformer in ``0_Transformer``."""
    shutil.copytree(src, dst)
    modules = json.loads((dst / "modules.json").read_text())
    names = {"Transformer": "Transformer", "Pooling": "Pooling", "Normalize": "Normalize"}
    for m in modules:
        m["type"] = "sentence_transformers.models." + names[m["type"].rsplit(".", 1)[-1]]
    bert = json.loads((dst / "sentence_bert_config.json").read_text())
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    max_len = tok_config.pop("model_max_length")
    _write(dst / "tokenizer_config.json", tok_config)
    assert "max_seq_length" not in bert
    _write(dst / "sentence_bert_config.json", {"max_seq_length": max_len, "do_lower_case": False})
    pooling = json.loads((dst / "1_Pooling/config.json").read_text())
    mode = pooling.pop("pooling_mode")
    flags = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max", "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
             "weightedmean_tokens": "weightedmean", "lasttoken": "lasttoken"}
    old = {"word_embedding_dimension": pooling.pop("embedding_dimension")}
    old |= {f"pooling_mode_{k}": v == mode for k, v in flags.items()}
    _write(dst / "1_Pooling/config.json", old | pooling)
    if (dst / "2_Normalize/config.json").exists():
        (dst / "2_Normalize/config.json").unlink()
    model = json.loads((dst / "config_sentence_transformers.json").read_text())
    _write(dst / "config_sentence_transformers.json", {
        "__version__": {"sentence_transformers": "3.0.1", "transformers": "4.41.2", "pytorch": "2.3.0"},
        "prompts": model["prompts"], "default_prompt_name": model["default_prompt_name"]})
    if subfolder:
        (dst / "0_Transformer").mkdir()
        for f in list(dst.iterdir()):
            if f.is_file() and f.name not in ("modules.json", "config_sentence_transformers.json", "README.md"):
                f.rename(dst / "0_Transformer" / f.name)
        modules[0]["path"] = "0_Transformer"
    _write(dst / "modules.json", modules)
    return dst


@pytest.mark.parametrize("subfolder", [False, True])
@pytest.mark.parametrize("name", ["last", "mean"])
def test_older_layouts(st_dirs, converted, tmp_path, name, subfolder):
    old = _old_layout(st_dirs[name], tmp_path / "old", subfolder)
    engine = Engine.from_pretrained(convert(old, tmp_path / "engine", quiet=True))
    new = EngineConfig.read(converted[name])
    assert (engine.config.pooling, engine.config.include_prompt, engine.config.normalize, engine.config.max_length,
            engine.config.prompts, engine.config.default_prompt_name) == (
        new.pooling, new.include_prompt, new.normalize, new.max_length, new.prompts, new.default_prompt_name)
    # sentence-transformers reads the old layout itself, to the same model.
    expected = SentenceTransformer(str(old), device="cpu").encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    assert_rel_close(engine.encode(TEXTS, prompt_name="query"), expected)


def test_flags_override_the_directory(st_dirs, tmp_path):
    argv = [str(st_dirs["last"]), str(tmp_path / "engine"), "--quiet", "--pooling", "mean", "--no-normalize",
            "--attention", "bidirectional", "--no-include-prompt", "--max-length", "20", "--append-eos"]
    assert main(argv) == 0
    cfg = EngineConfig.read(tmp_path / "engine")
    assert (cfg.pooling, cfg.normalize, cfg.include_prompt, cfg.max_length, cfg.append_eos) == (
        "mean", False, False, 20, True)
    assert cfg.model.attention == "bidirectional"


def _edit(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    _write(path, data)


def _add_module(root, kind):
    modules = json.loads((root / "modules.json").read_text())
    (root / f"3_{kind}").mkdir()
    modules.append({"idx": 3, "name": "3", "path": f"3_{kind}", "type": f"sentence_transformers.models.{kind}"})
    _write(root / "modules.json", modules)


REFUSALS = {
    "max pooling": (lambda d: _edit(d / "1_Pooling/config.json", pooling_mode="max"), "pooling mode 'max'"),
    "concatenated": (lambda d: _edit(d / "1_Pooling/config.json", pooling_mode=["mean", "lasttoken"]), "concatenated"),
    "weightedmean without prompt": (lambda d: _edit(d / "1_Pooling/config.json", pooling_mode="weightedmean",
                                                    include_prompt=False), "include_prompt=false"),
    "dense": (lambda d: _add_module(d, "Dense"), "module Dense"),
    "lower case": (lambda d: _edit(d / "sentence_bert_config.json", do_lower_case=True), "do_lower_case"),
    "task": (lambda d: _edit(d / "sentence_bert_config.json", transformer_task="text-generation"), "transformer_task"),
    "chat": (lambda d: _edit(d / "sentence_bert_config.json", modality_config={"message": {}}), "modality_config"),
    "config args": (lambda d: _edit(d / "sentence_bert_config.json", config_kwargs={"rope_theta": 5.0}), "rope_theta"),
    "sparse": (lambda d: _edit(d / "config_sentence_transformers.json", model_type="SparseEncoder"), "SparseEncoder"),
    "normalize tokens": (lambda d: _edit(d / "2_Normalize/config.json", module_input_name="token_embeddings"),
                         "token_embeddings"),
    "custom code": (lambda d: _write(d / "modules.json", [{"idx": 0, "name": "0", "path": "",
                                                           "type": "custom_module.MyTransformer"}]), "custom code"),
    "outside": (lambda d: _write(d / "modules.json", [{"idx": 0, "name": "0", "path": "../elsewhere",
                                                       "type": "sentence_transformers.models.Transformer"}]),
                "leaves the directory"),
    "beyond context": (lambda d: _edit(d / "sentence_bert_config.json", max_seq_length=100000),
                       "max_position_embeddings"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_cannot_be_served_is_refused_by_name(st_dirs, tmp_path, case):
    edit, message = REFUSALS[case]
    src = shutil.copytree(st_dirs["last"], tmp_path / "src")
    edit(src)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out" / "engine", quiet=True)
    assert not (tmp_path / "out").exists()
