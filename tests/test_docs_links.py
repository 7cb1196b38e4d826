"""The docs stand alone in a clone: every link resolves inside the repository, nothing cites shared/ files."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Citations of files that exist only beside the repository on the developers' machines.
OUTSIDE = re.compile(r"NOTES §|NOTES\.md|MEASURED\.md|/work/|\.\./shared/(paper|docs)")


def _cited_files():
    for folder in ("piece_cl", "configs", "scripts", "tests"):
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".yaml", ".sh", ".md"})
    yield from DOCS


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves_inside_the_repository(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links outside the repository or to nothing: {broken}"


def test_nothing_cites_files_that_a_clone_does_not_have():
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in _cited_files() if p.name != Path(__file__).name
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, f"cite docs/paper-notes.md or docs/measured.md instead: {hits}"
