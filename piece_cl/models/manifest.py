"""A cached model directory is trusted only when it matches the manifest written last into it.

Why: `from_pretrained` fills a tensor missing from model.safetensors with random values and goes on, so
a damaged miniature cache scored 0.00 on the probe instead of 62.50 with exit 0. The manifest records
every file's size and the tensor names of each .safetensors file; it is written after everything else
(so an interrupted write leaves no manifest), and `verify` refuses any difference naming the directory
to delete (the next run then pretrains it again).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from piece_cl.errors import PieceError
from piece_cl.io import atomic_write_json

MANIFEST = "manifest.json"


def safetensors_names(path: Path) -> list[str]:
    """Tensor names from a .safetensors header (8-byte little-endian length, then JSON), without loading."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > 100_000_000:
            raise ValueError("header length is implausible")
        header = json.loads(handle.read(length))
    return sorted(name for name in header if name != "__metadata__")


def describe(directory: Path) -> dict:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    tensors = {name: safetensors_names(directory / name) for name in files if name.endswith(".safetensors")}
    return {"files": files, "tensors": tensors}


def write_manifest(directory: Path) -> None:
    """Call after every other file is in place."""
    atomic_write_json(directory / MANIFEST, describe(directory))


def has_manifest(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def verify(directory: Path) -> None:
    """Refuse a directory that differs from its manifest (or has an unreadable one), naming it."""
    delete = f"delete {directory} and rerun (it is rebuilt)"
    try:
        expected = json.loads((directory / MANIFEST).read_text())
        files, tensors = expected["files"], expected["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PieceError(f"cached model {directory} has an unreadable {MANIFEST} ({err}); {delete}") from None
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise PieceError(f"cached model {directory} is incomplete: {name} is missing; {delete}")
        if path.stat().st_size != size:
            raise PieceError(f"cached model {directory} is damaged: {name} has {path.stat().st_size} bytes, "
                             f"the manifest says {size}; {delete}")
    for name, names in tensors.items():
        try:
            found = safetensors_names(directory / name)
        except (OSError, ValueError) as err:
            raise PieceError(f"cached model {directory} is damaged: {name} is unreadable ({err}); {delete}") from None
        if found != names:
            missing = sorted(set(names) - set(found)) or sorted(set(found) - set(names))
            raise PieceError(f"cached model {directory} is damaged: {name} differs from the manifest "
                             f"(e.g. {missing[0]}); {delete}")
