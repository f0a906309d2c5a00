"""The independent reference for embeddings: a transformers decoder (peft adapters loaded into it or
not), made bidirectional by an explicit 4-D padding mask on right-padded batches, with the text
tokens found from the tokenizer's offsets and pooled in float64 here, not by the engine's code."""
from __future__ import annotations

import torch

POOLINGS = ("mean", "weighted_mean", "last_token", "bos_token")


def hf_embeddings(decoder, tokenizer, inputs: list, pooling: str, max_length: int) -> torch.Tensor:
    """float64 [batch, hidden]. ``decoder``: the bare transformer (``*Model``, not ``*ForCausalLM``)
    returning ``last_hidden_state``; inputs: texts or (instruction, text) pairs."""
    texts, text_starts = [], []
    for item in inputs:
        instruction, text = ("", item) if isinstance(item, str) else (item[0].strip(), item[1])
        texts.append(f"{instruction} {text}" if instruction else text)
        text_starts.append(len(instruction) + 1 if instruction else 0)
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    lengths = [len(ids) for ids in enc["input_ids"]]
    width = max(lengths)
    ids = torch.full((len(texts), width), tokenizer.pad_token_id)
    for b, row in enumerate(enc["input_ids"]):
        ids[b, : len(row)] = torch.tensor(row)
    # Bidirectional: every query row sees every real key of its sequence, no padding key.
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    mask = torch.zeros(len(texts), 1, width, width)
    mask.masked_fill_(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    with torch.no_grad():
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    rows = []
    for b, (offsets, n) in enumerate(zip(enc["offset_mapping"], lengths)):
        text_tokens = [j for j, (s, e) in enumerate(offsets) if e > s and e > text_starts[b]]
        if pooling == "mean":
            rows.append(hidden[b, text_tokens].mean(0))
        elif pooling == "weighted_mean":
            w = torch.arange(1, len(text_tokens) + 1, dtype=torch.float64)
            rows.append((hidden[b, text_tokens] * w[:, None]).sum(0) / w.sum())
        elif pooling == "last_token":
            rows.append(hidden[b, n - 1])
        elif pooling == "bos_token":
            rows.append(hidden[b, 0])
        else:
            raise ValueError(f"unknown pooling {pooling!r}")
    return torch.stack(rows)
