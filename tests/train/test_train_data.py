"""Data files, MNTP chunking and masking, batch order and options: no model needed."""
import json

import pytest
import torch

from engine.batch import pack
from engine.train.config import LORA_TARGETS, TrainError, make_config
from engine.train.data import (
    IGNORE_INDEX,
    BatchOrder,
    DataError,
    mask_tokens,
    mntp_chunks,
    read_pairs,
    read_texts,
)
from engine.train.objectives import mntp_targets


# ---------------------------------------------------------------------------------------------------
# MNTP masking and the label shift


def test_masking_proportions_on_a_hand_made_batch():
    n = 50_000
    ids = torch.arange(n) % 300 + 10  # never the mask id 5
    special = torch.zeros(n, dtype=torch.bool)
    special[::10] = True  # every tenth token is special: never selected
    gen = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(ids, special, 0.2, mask_id=5, random_vocab=400, generator=gen)

    selected = labels != IGNORE_INDEX
    assert not selected[special].any()
    assert torch.equal(labels[selected], ids[selected])  # labels are the original tokens
    assert torch.equal(inputs[~selected], ids[~selected])  # unselected tokens are untouched
    rate = selected[~special].float().mean().item()
    assert abs(rate - 0.2) < 0.01, rate
    n_sel = int(selected.sum())
    masked = (inputs[selected] == 5).float().mean().item()
    kept = (inputs[selected] == ids[selected]).float().mean().item()
    randomised = 1 - masked - kept
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.015 and abs(randomised - 0.1) < 0.015, (masked, kept, n_sel)
    assert int(inputs.max()) < 400


def test_all_mask_replaces_every_selected_token():
    ids = torch.arange(5_000) % 50 + 10
    special = torch.zeros_like(ids, dtype=torch.bool)
    inputs, labels = mask_tokens(ids, special, 0.8, mask_id=3, random_vocab=60, all_mask=True,
                                 generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    assert abs(selected.float().mean().item() - 0.8) < 0.03
    assert (inputs[selected] == 3).all() and torch.equal(inputs[~selected], ids[~selected])


def test_masking_is_a_function_of_the_seed():
    ids, special = torch.arange(100), torch.zeros(100, dtype=torch.bool)
    a = mask_tokens(ids, special, 0.3, 0, 100, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, special, 0.3, 0, 100, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_label_shift_predicts_position_i_from_row_i_minus_1():
    # Two packed sequences of lengths 4 and 3. Selected: positions 2 and 3 of the first, 0 and 2 of
    # the second. Position 0 has no predecessor: it is masked in the input but never counted.
    batch = pack([[11, 12, 13, 14], [21, 22, 23]])
    labels = torch.full((7,), IGNORE_INDEX)
    labels[[2, 3, 4, 6]] = torch.tensor([13, 14, 21, 23])
    rows, targets = mntp_targets(labels, batch)
    assert rows.tolist() == [1, 2, 5]  # packed rows 2-1, 3-1 and (4+2)-1; not 4-1 (the other sequence)
    assert targets.tolist() == [13, 14, 23]


def test_mntp_chunks_group_the_tokenised_stream():
    class Tok:
        def __call__(self, texts, **kwargs):
            ids = [[1] + [100 + len(t) + i for i in range(len(t))] for t in texts]  # BOS then one id per char
            return {"input_ids": ids, "special_tokens_mask": [[1] + [0] * len(t) for t in texts]}

    chunks = mntp_chunks(Tok(), ["abcde", "xyz", "pq"], max_seq_length=4)
    stream = [1, 105, 106, 107, 108, 109, 1, 103, 104, 105, 1, 102, 103]
    assert [c.input_ids for c in chunks] == [stream[0:4], stream[4:8], stream[8:12]]  # the 1-token tail is dropped
    assert [c.special for c in chunks][1] == [False, False, True, False]
    assert len(mntp_chunks(Tok(), ["abcdef"], max_seq_length=4)[-1].input_ids) == 3  # a shorter tail is kept


# ---------------------------------------------------------------------------------------------------
# Files


def test_text_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(DataError, match="empty or blank"):
        read_texts(tmp_path / "blank.txt")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\r\nfine\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8") as err:
        read_texts(tmp_path / "bad.txt")
    assert f"{tmp_path / 'bad.txt'}:4: not UTF-8" in str(err.value)  # named as FILE:LINE
    (tmp_path / "ok.txt").write_text("a\n\nb\r\n")
    assert read_texts(tmp_path / "ok.txt") == ["a", "b"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"query": "q", "positive": ', "malformed JSON"),
        ('["q", "p"]', "expected a JSON object"),
        ('{"query": "q"}', "missing 'positive'"),
        ('{"query": "q", "positive": 3}', "'positive' must be a string"),
        ('{"query": " ", "positive": "p"}', "'query' is empty"),
        ('{"query": "q", "positive": "p", "label": 1}', "unknown keys"),
    ],
)
def test_malformed_jsonl_names_its_line(tmp_path, line, message):
    good = json.dumps({"query": "q", "positive": "p", "negative": "n", "instruction": "i"})
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DataError, match=message) as err:
        read_pairs(path)
    assert f"{path}:3:" in str(err.value)


def test_pairs_optional_fields(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q1", "positive": "p1"}\n{"query": "q2", "positive": "p2", "negative": null, "instruction": " Find "}\n')
    a, b = read_pairs(path)
    assert (a.negative, a.instruction, a.line) == (None, "", 1)
    assert (b.negative, b.instruction, b.line) == (None, "Find", 2)
    path.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_pairs(path)


# ---------------------------------------------------------------------------------------------------
# Batch order and options


def test_batch_order_gives_the_same_global_batches_for_any_process_count():
    one = BatchOrder(50, 8, world=1, rank=0, seed=3)
    two = [BatchOrder(50, 4, world=2, rank=r, seed=3) for r in range(2)]
    for k in range(15):  # crosses epochs (6 global batches per epoch, the incomplete one dropped)
        epoch, idx = one(k)
        assert idx == two[0](k)[1] + two[1](k)[1] and epoch == k // 6
    seen = sorted(i for k in range(6) for i in one(k)[1])
    assert len(set(seen)) == 48  # an epoch is a permutation
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchOrder(7, 4, world=2, rank=0, seed=0)


def test_options_defaults_file_and_flags(tmp_path):
    mntp = make_config("mntp", model="m", data="d", out="o")
    assert (mntp.lr, mntp.batch_size, mntp.max_seq_length, mntp.mlm_probability, mntp.mask_token) == (5e-5, 32, 512, 0.2, "blank")
    assert (mntp.lora_r, mntp.alpha, mntp.lora_dropout, tuple(mntp.lora_targets)) == (16, 32.0, 0.05, LORA_TARGETS)
    simcse = make_config("simcse", model="m", data="d", out="o")
    assert (simcse.lr, simcse.batch_size, simcse.max_seq_length, simcse.simcse_dropout, simcse.loss_scale) == (3e-5, 128, 128, 0.3, 20.0)
    sup = make_config("supervised", model="m", data="d", out="o")
    assert (sup.lr, sup.batch_size, sup.warmup_steps, sup.loss_scale, sup.gradient_checkpointing) == (2e-4, 64, 300, 50.0, True)

    file = tmp_path / "cfg.json"
    file.write_text(json.dumps({"model": "m", "data": "d", "out": "o", "steps": 7, "lr": 1e-3, "lora": "a"}))
    cfg = make_config("simcse", file, lr=2e-3, steps=None)
    assert (cfg.steps, cfg.lr, cfg.lora) == (7, 2e-3, ["a"])  # flag beats file; an unset flag does not
    file.write_text(json.dumps({"model": "m", "data": "d", "out": "o", "stepz": 7}))
    with pytest.raises(TrainError, match="unknown options"):
        make_config("simcse", file)
    with pytest.raises(TrainError, match="steps must be a positive integer, got 0"):
        make_config("mntp", model="m", data="d", out="o", steps=0)
    with pytest.raises(TrainError, match="lora-targets"):
        make_config("mntp", model="m", data="d", out="o", lora_targets=["q_proj", "lm_head"])
