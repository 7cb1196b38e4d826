"""docs/design.md's layout is the package: every module is named there and every name there exists.

The layout block is an indented tree (two spaces per level); a name with `*` or `<...>` stands for a
family of files (one method per file, the sandbox's private parts).
"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DESIGN = REPO / "docs" / "design.md"


def layout_entries(text: str) -> list[str]:
    """Paths (relative to the repository) named by the first fenced block after '## Layout'."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    stack: list[tuple[int, str]] = []
    entries = []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+\.py|\S+/)(\s|$)", line)
        if not match:
            continue  # a continuation line of the description above
        depth, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        path = "/".join([parent for _, parent in stack] + [name.rstrip("/")])
        entries.append(path)
        if name.endswith("/"):
            stack.append((depth, name.rstrip("/")))
    return entries


def as_pattern(entry: str) -> str:
    return re.sub(r"<[^>]+>", "*", entry)


def test_layout_names_every_module_and_only_existing_ones():
    entries = layout_entries(DESIGN.read_text(encoding="utf-8"))
    assert entries[0] == "piece_cl", entries[:3]
    modules = sorted(str(path.relative_to(REPO)) for path in (REPO / "piece_cl").rglob("*.py")
                     if path.name != "__init__.py")
    patterns = [as_pattern(entry) for entry in entries if entry.endswith(".py")]
    unnamed = [module for module in modules if not any(fnmatch.fnmatch(module, p) for p in patterns)]
    assert unnamed == [], f"docs/design.md's layout does not name {unnamed}"
    missing = [entry for entry in entries if not any(fnmatch.fnmatch(m, as_pattern(entry)) or
                                                     m.startswith(as_pattern(entry) + "/") for m in modules)]
    assert missing == [], f"docs/design.md names what does not exist: {missing}"


def test_layout_parser_sees_nesting_and_rejects_a_stale_name():
    text = "## Layout\n```\npiece_cl/\n  run.py   x\n  gone.py  y\n  data/\n    records.py  z\n  io.py\n```\n"
    assert layout_entries(text) == ["piece_cl", "piece_cl/run.py", "piece_cl/gone.py", "piece_cl/data",
                                    "piece_cl/data/records.py", "piece_cl/io.py"]
