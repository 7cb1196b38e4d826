"""Read task records and check their shape, naming file and record on error.

Records come from .json, .jsonl or .json.gz, or, as TRACE and VQA copies are often kept, from a
parquet file or a directory saved by Hugging Face `datasets` (`Dataset.save_to_disk`; a
`DatasetDict.save_to_disk(task_dir)` gives one such directory per split). The file helpers every
benchmark's loader shares (which file holds a split, the held-out sample) live here, once.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import tempfile
import zlib
from pathlib import Path

from piece_cl.errors import PieceError

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
TABLE_SUFFIXES = (".parquet",)


def _read_text(path: Path) -> str:
    """The file's text; a bad gzip stream, a non-UTF-8 byte or an unreadable file is one line naming it."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise PieceError(f"{path}: not a valid gzip file ({err}); recompress it or drop the .gz suffix") from None
    except OSError as err:
        raise PieceError(f"cannot read {path} ({err.strerror}); fix its permissions") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise PieceError(f"{path}: line {line} (byte {err.start}) holds {raw[err.start:err.start + 1]!r}, which is not "
                         "UTF-8; re-encode the file as UTF-8") from None


def _parse(path: Path, text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = f" at line {err.lineno}" if where == "" else ""
        raise PieceError(f"{path}: malformed JSON{where} ({err.msg}{line})") from None
    except RecursionError:
        raise PieceError(f"{path}: JSON{where} is nested too deeply to read; records are flat objects") from None


def _check_strings(path: Path, index: int, value, key: str = "") -> None:
    """A lone surrogate (a JSON escape such as \\ud800) is valid JSON but no text a tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise PieceError(f"{path}: record {index} field '{key}' holds a lone surrogate "
                             f"({value[err.start]!r} at character {err.start}); fix or drop that record") from None
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_strings(path, index, item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _check_strings(path, index, item, f"{key}[{position}]")


def load_json_any(path: str | Path) -> list:
    """A JSON list, a JSON-lines file, or either gzipped; errors name the file (and line for JSONL)."""
    path = Path(path)
    if not path.is_file():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.R_OK | os.X_OK):
            raise PieceError(f"cannot read directory {parent} (permission denied), so {path} cannot be found; "
                             "fix its permissions")
        raise PieceError(f"data file not found: {path}")
    text = _read_text(path)
    is_lines = path.name.endswith((".jsonl", ".jsonl.gz"))
    if not is_lines:
        data = _parse(path, text, "")
        if not isinstance(data, list):
            raise PieceError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        records.append(_parse(path, line, f" on line {lineno}"))
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
        _check_strings(path, index, record)
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
