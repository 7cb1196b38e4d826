"""Plain built-in values across a pipe between the test harness and the sandboxed candidate.

Only exact built-in types cross (None, bool, int, float, complex, str, bytes, list, tuple, dict, set,
frozenset), as tagged JSON, so the receiver rebuilds fresh objects of its own: no custom `__eq__`, no
subclass, no code object and no reference into the sender's interpreter can arrive. Anything else is
refused (`NotPlain`) and the call counts as failed. Standard library only (imported by path in the children).
"""

import json
import os
import struct

MAX_FRAME = 16 * 1024 * 1024
MAX_DEPTH = 100
_HEADER = struct.Struct(">I")


class NotPlain(ValueError):
    """A value that is not a plain built-in (or a malformed message)."""


def encode(value, depth: int = 0):
    """A JSON-ready form of `value`; exact types only (a subclass of int is not an int here)."""
    if depth > MAX_DEPTH:
        raise NotPlain("nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return {"f": repr(value)}  # keeps nan, inf and -0.0 exact
    if kind is list:
        return [encode(item, depth + 1) for item in value]
    if kind is tuple:
        return {"t": [encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {"s" if kind is set else "fs": [encode(item, depth + 1) for item in value]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is complex:
        return {"c": [repr(value.real), repr(value.imag)]}
    raise NotPlain(f"{kind.__module__}.{kind.__qualname__} is not a plain built-in value")


def decode(data):
    """The value `encode` described, built from scratch; NotPlain for anything malformed."""
    kind = type(data)
    if data is None or kind in (bool, int, str):
        return data
    if kind is list:
        return [decode(item) for item in data]
    if kind is not dict or len(data) != 1:
        raise NotPlain(f"malformed value {kind.__name__}")
    (tag, body), = data.items()
    try:
        if tag == "f":
            return float(_text(body))
        if tag == "c":
            return complex(float(_text(body[0])), float(_text(body[1])))
        if tag == "b":
            return bytes.fromhex(_text(body))
        items = [decode(item) for item in _items(body)]
        if tag == "t":
            return tuple(items)
        if tag == "s":
            return set(items)
        if tag == "fs":
            return frozenset(items)
        if tag == "d":
            return {key: value for key, value in (_pair(item) for item in items)}
    except (TypeError, ValueError, IndexError) as error:
        raise NotPlain(f"malformed value: {error}") from None
    raise NotPlain(f"unknown tag {tag!r}")


def _text(body) -> str:
    if type(body) is not str:
        raise NotPlain("malformed number")
    return body


def _items(body) -> list:
    if type(body) is not list:
        raise NotPlain("malformed container")
    return body


def _pair(item):
    if type(item) is not list or len(item) != 2:
        raise NotPlain("malformed dict item")
    return item[0], item[1]


def send(fd: int, message) -> None:
    """One frame: 4-byte length, then the message as ASCII JSON (lone surrogates escaped)."""
    payload = json.dumps(message, ensure_ascii=True, allow_nan=False).encode("ascii")
    if len(payload) > MAX_FRAME:
        raise NotPlain(f"message of {len(payload)} bytes is over the {MAX_FRAME}-byte limit")
    data = _HEADER.pack(len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def receive(fd: int):
    """The next frame's message; EOFError at a clean end, NotPlain for an oversized or broken frame."""
    header = _read_exactly(fd, _HEADER.size, eof_ok=True)
    if header is None:
        raise EOFError("the other side closed the pipe")
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise NotPlain(f"message of {size} bytes is over the {MAX_FRAME}-byte limit")
    try:
        return json.loads(_read_exactly(fd, size, eof_ok=False).decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise NotPlain(f"malformed message: {type(error).__name__}") from None


def _read_exactly(fd: int, size: int, eof_ok: bool) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            if eof_ok and remaining == size:
                return None
            raise NotPlain("message cut short")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
