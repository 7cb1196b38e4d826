"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

A write that fails because the disk, the quota or the file-size limit is full raises `DiskFullError`
naming the file, whichever library did the writing, so the CLI can say what to free and how to resume.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' SafetensorError reports an I/O error


class DiskFullError(OSError):
    """A write refused for lack of space (ENOSPC, EDQUOT or EFBIG); `filename` is what was being written."""


def disk_full_errno(err: BaseException | None) -> int | None:
    """The errno when `err` or anything that caused it is a disk-full condition, else None.

    torch.save reports a failed write as a RuntimeError whose context is the OSError; safetensors only
    as text ending in "(os error 28)"; both are recognised.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err.errno
        match = _RUST_OS_ERROR.search(str(err))
        if match and int(match.group(1)) in DISK_FULL_ERRNOS:
            return int(match.group(1))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a disk-full failure inside the block into `DiskFullError` naming `path` (the innermost name wins)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        code = disk_full_errno(err)
        if code is None:
            raise
        raise DiskFullError(code, os.strerror(code), str(path)) from err


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors file written under a temporary name, fsynced and renamed (masks, stage state)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a partial file would only hold on to the space that ran out
            raise
