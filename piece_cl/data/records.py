"""Read task records from .json, .jsonl or .json.gz and check their shape, naming file and record on error.

The file helpers every benchmark's loader shares (which file holds a split, the held-out sample) live
here, once.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from piece_cl.errors import PieceError

DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read()


def load_json_any(path: str | Path) -> list:
    """A JSON list, a JSON-lines file, or either gzipped; errors name the file (and line for JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise PieceError(f"data file not found: {path}")
    text = _read_text(path)
    is_lines = path.name.endswith((".jsonl", ".jsonl.gz"))
    if not is_lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PieceError(f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, list):
            raise PieceError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise PieceError(f"{path}: malformed JSON on line {lineno} ({err.msg})") from None
    return records


def load_records(path: str | Path, required: tuple[str, ...] = ("prompt", "answer"), limit: int | None = None) -> list[dict]:
    """Records with string fields `required`; the first bad record is reported by index."""
    records = load_json_any(path)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise PieceError(f"{path}: record {index} is {type(record).__name__}, expected an object with {list(required)}")
        for key in required:
            if not isinstance(record.get(key), str):
                raise PieceError(f"{path}: record {index} has no string field '{key}'")
    return records[:limit] if limit is not None else records


def find_split_file(task_dir: Path, split: str) -> Path:
    """`<split>.json`, `.jsonl` or `.json.gz` in `task_dir`, whichever exists."""
    for suffix in DATA_SUFFIXES:
        candidate = task_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise PieceError(f"no {split}.json / .jsonl / .json.gz in {task_dir}")


def held_out_sample(records: list, size: int | None, seed: int, name: str) -> list:
    """A fixed random sample (same seed, same records) for held-out loss curves."""
    if size is None or size >= len(records):
        return records
    rng = random.Random(f"{seed}/{name}/eval")
    return [records[i] for i in sorted(rng.sample(range(len(records)), size))]
