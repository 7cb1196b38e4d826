"""Turn `{"prompt", "answer"}` records into causal-LM batches with loss on the answer (+ EOS) only."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def encode_record(tokenizer, record: dict, max_prompt_len: int, max_answer_len: int) -> dict[str, list[int]]:
    """Prompt tokens (labels ignored) then answer tokens + EOS (labels kept).

    Over-long prompts are truncated on the LEFT (the instruction's end, next to the answer, is what the
    model must see); over-long answers on the right. Prompt and answer are tokenised separately so the
    label boundary never depends on a BPE merge across it.
    """
    prompt_ids = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"][-max_prompt_len:]
    answer_ids = tokenizer(record["answer"], add_special_tokens=False)["input_ids"][: max_answer_len - 1]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def collate(features: list[dict[str, list[int]]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest sequence; labels are IGNORE_INDEX on padding, attention mask 0 there."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids, labels, attention = [], [], []
    for f in features:
        pad = width - len(f["input_ids"])
        ids, lab, att = f["input_ids"], f["labels"], [1] * len(f["input_ids"])
        if side == "right":
            input_ids.append(ids + [pad_id] * pad)
            labels.append(lab + [IGNORE_INDEX] * pad)
            attention.append(att + [0] * pad)
        else:
            input_ids.append([pad_id] * pad + ids)
            labels.append([IGNORE_INDEX] * pad + lab)
            attention.append([0] * pad + att)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
    }


def encode_all(tokenizer, records: list[dict], max_prompt_len: int, max_answer_len: int) -> list[dict[str, list[int]]]:
    return [encode_record(tokenizer, r, max_prompt_len, max_answer_len) for r in records]
