"""The inputs of the authors' importance pass (protocol=official_code), not piece_cl's training encoding.

Their pass cut inputs to 256 + 128 tokens (docs/paper-notes.md §3), dropping BOS when it cut: the
behaviour of the `DataCollator` of the TRACE code base (utils/data/data_collator.py) at max_prompt_len
256, max_ans_len 128; it used a mini-batch of 1 for MeetingBank, ScienceQA, 20Minuten, Py150 and of 4
otherwise. That collator does not cut prompt and answer separately: it tokenises `prompt + answer` as one string
(no special tokens) and keeps the FIRST 256 + 128 tokens; it appends EOS only if the cut left room, then
BOS only if there is still room, so a cut sequence carries neither; and it labels the last
len(answer tokens + EOS) positions, which after a cut are prompt tokens, not the answer. That is
reproduced as written, so official_code scores what their pass scored; docs/importance.md compares it
with the training encoding (data/collate.py).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from piece_cl.data.collate import IGNORE_INDEX
from piece_cl.data.multimodal import is_multimodal
from piece_cl.errors import PieceError

AUTHORS_PROMPT_LEN = 256
AUTHORS_ANSWER_LEN = 128
TRUNCATIONS = ("training", "authors")  # method.importance.truncation


def _authors_tokenize(tokenizer, text: str, limit: int, bos: bool, eos: bool) -> list[int]:
    """TRACE `DataCollator.tokenize`: first `limit` tokens, then EOS and BOS each only while shorter.

    A tokenizer without a BOS token (Qwen) gets none; theirs would have failed there.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"][:limit])
    if eos and len(ids) < limit:
        ids.append(tokenizer.eos_token_id)
    if bos and len(ids) < limit and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_like_authors(tokenizer, record: dict, max_prompt_len: int = AUTHORS_PROMPT_LEN,
                        max_answer_len: int = AUTHORS_ANSWER_LEN) -> dict[str, list[int]]:
    """One record as the authors' collator encoded it for training-style batches (labels on the tail)."""
    limit = int(max_prompt_len) + int(max_answer_len)
    label = _authors_tokenize(tokenizer, record["answer"], limit, bos=False, eos=True)
    full = _authors_tokenize(tokenizer, record["prompt"] + record["answer"], limit, bos=True, eos=True)
    n = min(len(label), len(full))
    return {"input_ids": full, "labels": [IGNORE_INDEX] * (len(full) - n) + full[len(full) - n:]}


def batch_size_for_task(setting, task: str) -> int:
    """The importance mini-batch of `task`: one number for every task, or a {task: size} table."""
    if isinstance(setting, Mapping):
        if task not in setting:
            raise PieceError(f"method.importance.batch_size has no entry for task '{task}': add "
                             f"benchmark.importance.batch_size.{task}=N (or set method.importance.batch_size=N)")
        setting = setting[task]
    try:
        size = int(setting)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or str(size) != str(setting).strip():
        raise PieceError(f"importance batch size for task '{task}' must be a positive integer, got {setting!r}")
    return size


def importance_features(tokenizer, records: list[dict], truncation: str, encode: Callable[[list[dict]], list[dict]],
                        max_prompt_len: int | None = None, max_answer_len: int | None = None) -> list[dict]:
    """`truncation="training"`: the training encoding `encode` (the paper); `"authors"`: their collator,
    cut at `max_prompt_len` + `max_answer_len` (None: their 256 + 128).

    Multimodal records always take `encode` (the processor's encoding): the authors' multimodal
    collator is not described in the notes this follows.
    """
    if truncation not in TRUNCATIONS:
        raise PieceError(f"method.importance.truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if truncation == "training" or is_multimodal(tokenizer):
        return encode(records)
    prompt_len = AUTHORS_PROMPT_LEN if max_prompt_len is None else int(max_prompt_len)
    answer_len = AUTHORS_ANSWER_LEN if max_answer_len is None else int(max_answer_len)
    return [encode_like_authors(tokenizer, r, prompt_len, answer_len) for r in records]
