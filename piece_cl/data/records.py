"""Read task records and check their shape, naming file and record on error.

Records come from .json, .jsonl or .json.gz, or, as TRACE and VQA copies are often kept, from a
parquet file or a directory saved by Hugging Face `datasets` (`Dataset.save_to_disk`; a
`DatasetDict.save_to_disk(task_dir)` gives one such directory per split). The file helpers every
benchmark's loader shares (which file holds a split, the held-out sample) live here, once.
"""
from __future__ import annotations

import gzip
import json
import random
import tempfile
from pathlib import Path

from piece_cl.errors import PieceError

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
TABLE_SUFFIXES = (".parquet",)


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


def is_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets`' `Dataset.save_to_disk`."""
    return (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def load_table(path: str | Path) -> list[dict]:
    """The rows of a parquet file or a `save_to_disk` directory, read locally by `datasets` (nothing is
    fetched; parquet's arrow cache goes to a temporary directory, not the user's cache)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    path = Path(path)
    if not (path.is_file() or is_dataset_dir(path)):
        raise PieceError(f"data file not found: {path}")
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path), keep_in_memory=True).to_list()
        with tempfile.TemporaryDirectory(prefix="piece-parquet-") as cache:
            return datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True).to_list()
    except (OSError, ValueError, DatasetGenerationError) as err:
        kind = "Hugging Face dataset directory" if path.is_dir() else "parquet file"
        raise PieceError(f"{path}: not a readable {kind} ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def load_records(path: str | Path, required: tuple[str, ...] = ("prompt", "answer"), limit: int | None = None) -> list[dict]:
    """Records with string fields `required`; the first bad record is reported by index."""
    path = Path(path)
    records = load_table(path) if path.suffix in TABLE_SUFFIXES or path.is_dir() else load_json_any(path)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise PieceError(f"{path}: record {index} is {type(record).__name__}, expected an object with {list(required)}")
        for key in required:
            if not isinstance(record.get(key), str):
                raise PieceError(f"{path}: record {index} has no string field '{key}'")
    return records[:limit] if limit is not None else records


def find_split_file(task_dir: Path, split: str, tables: bool = True) -> Path:
    """`<split>.json`, `.jsonl` or `.json.gz` in `task_dir`, else (with `tables`: flat records that
    `load_records` reads) `<split>.parquet` or a `<split>/` directory saved by `datasets`."""
    for suffix in JSON_SUFFIXES + (TABLE_SUFFIXES if tables else ()):
        candidate = task_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    if tables and is_dataset_dir(task_dir / split):
        return task_dir / split
    tried = ".json / .jsonl / .json.gz" + (" / .parquet / a datasets save_to_disk directory" if tables else "")
    raise PieceError(f"no {split}{tried} in {task_dir}")


def held_out_sample(records: list, size: int | None, seed: int, name: str) -> list:
    """A fixed random sample (same seed, same records) for held-out loss curves."""
    if size is None or size >= len(records):
        return records
    rng = random.Random(f"{seed}/{name}/eval")
    return [records[i] for i in sorted(rng.sample(range(len(records)), size))]
