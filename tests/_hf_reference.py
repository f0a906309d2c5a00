"""The independent reference for embeddings: a transformers decoder (peft adapters loaded into it or
not) on right-padded batches, with the pooled tokens found from the tokenizer's offsets and pooled in
float64 here, not by the engine's code.

Attention as transformers itself runs it: causal is the model's own default mask (from the 2-D
padding mask, its sliding windows included); bidirectional is an explicit 4-D padding mask (a dict of
them, one per layer type, where sliding layers see keys within ``|q - k| <= window``, transformers'
bidirectional convention), as LLM2Vec runs these models.
"""
from __future__ import annotations

import torch

POOLINGS = ("mean", "weighted_mean", "last_token", "bos_token")


def hf_embeddings(
    decoder, tokenizer, inputs: list, pooling: str, max_length: int, *, causal: bool = False,
    sliding_window: int | None = None, append_eos: bool = False, prompt: str | None = None,
    include_prompt: bool = False,
) -> torch.Tensor:
    """float64 [batch, hidden]. ``decoder``: the bare transformer (``*Model``, not ``*ForCausalLM``)
    returning ``last_hidden_state``; inputs: texts or (instruction, text) pairs.

    ``sliding_window``: bidirectional only, the window of the decoder's ``sliding_attention`` layers
    (its forward must take a dict of masks per layer type). ``append_eos``: e5-mistral's recipe,
    truncate to ``max_length - 1`` then append the EOS id. ``prompt``: read ``prompt + text``.
    ``include_prompt``: pool every token (sentence-transformers); otherwise the text's own tokens,
    never a special token (the LLM2Vec rule).
    """
    texts, text_starts = [], []
    for item in inputs:
        if isinstance(item, str):
            prefix, text = prompt or "", item
        else:
            assert prompt is None, "a pair and a prompt"
            instruction = item[0].strip()
            prefix, text = (f"{instruction} " if instruction else ""), item[1]
        texts.append(prefix + text)
        text_starts.append(len(prefix))
    limit = max_length - 1 if append_eos else max_length
    enc = tokenizer(texts, truncation=True, max_length=limit, return_offsets_mapping=True)
    rows_ids = [list(ids) for ids in enc["input_ids"]]
    offsets = [list(o) for o in enc["offset_mapping"]]
    if append_eos:
        for ids, offs in zip(rows_ids, offsets):
            ids.append(tokenizer.eos_token_id)
            offs.append((0, 0))
    lengths = [len(ids) for ids in rows_ids]
    width = max(lengths)
    ids = torch.full((len(texts), width), tokenizer.pad_token_id)
    for b, row in enumerate(rows_ids):
        ids[b, : len(row)] = torch.tensor(row)
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # real tokens [batch, width]
    with torch.no_grad():
        if causal:
            mask = keep.long()
        else:
            mask = _additive(keep[:, None, None, :].expand(-1, 1, width, -1))
            if sliding_window is not None:
                q = torch.arange(width)[:, None]
                near = (q - torch.arange(width)[None, :]).abs() <= sliding_window
                mask = {"full_attention": mask,
                        "sliding_attention": _additive(keep[:, None, None, :] & near[None, None])}
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    rows = []
    for b, (offs, n) in enumerate(zip(offsets, lengths)):
        if include_prompt:
            pooled = list(range(n))
        else:
            pooled = [j for j, (s, e) in enumerate(offs) if e > s and e > text_starts[b]]
        if pooling == "mean":
            rows.append(hidden[b, pooled].mean(0))
        elif pooling == "weighted_mean":
            w = torch.arange(1, len(pooled) + 1, dtype=torch.float64)
            rows.append((hidden[b, pooled] * w[:, None]).sum(0) / w.sum())
        elif pooling == "last_token":
            rows.append(hidden[b, n - 1])
        elif pooling == "bos_token":
            rows.append(hidden[b, 0])
        else:
            raise ValueError(f"unknown pooling {pooling!r}")
    return torch.stack(rows)


def _additive(keep: torch.Tensor) -> torch.Tensor:
    """bool [batch, 1, q, k] (True: visible) -> float32 additive mask (0 or the most negative float)."""
    mask = torch.zeros(keep.shape)
    return mask.masked_fill_(~keep, torch.finfo(torch.float32).min)
