"""The docs' miniature tables are scripts/reproduce_docs.py's last output, not hand-copied numbers.

Fast, trains nothing: compares the marked blocks of README.md and docs/*.md with
docs/generated/miniature_tables.md as the script last wrote it.
"""
import hashlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce_docs.py"
GENERATED = ROOT / "docs" / "generated" / "miniature_tables.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# where each generated block must be shown
REQUIRED = {"README.md": {"table1", "ksweep"}, "miniature.md": {"seqft_r"}}


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reproduce_docs = _script()


def _generated() -> dict[str, str]:
    return reproduce_docs.blocks(GENERATED.read_text(encoding="utf-8"))


def _mismatches(doc_text: str, generated: dict[str, str]) -> list[str]:
    return [name for name, body in reproduce_docs.blocks(doc_text).items() if generated.get(name) != body]


def test_the_generated_file_names_its_commands_commit_and_machine():
    text = GENERATED.read_text(encoding="utf-8")
    assert "python scripts/reproduce_docs.py" in text
    for part, overrides in reproduce_docs.PARTS.items():
        assert f"`piece-run {' '.join(overrides)}`, then `piece-report <folder>`" in text, part
    assert len(reproduce_docs.METHODS) == 12
    assert re.search(r"commit [0-9a-f]{12}", text)
    assert "thread(s) (`OMP_NUM_THREADS=" in text and "CPU capability" in text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_marked_block_equals_the_generated_one(doc):
    text = doc.read_text(encoding="utf-8")
    opened, closed = text.count("<!-- reproduce_docs:"), text.count("<!-- /reproduce_docs:")
    found = reproduce_docs.blocks(text)
    assert opened == closed == len(re.findall(r"<!-- reproduce_docs:([a-z0-9_]+) -->", text)), \
        f"{doc.name}: unpaired reproduce_docs markers"
    assert len(found) == len(set(re.findall(r"<!-- reproduce_docs:([a-z0-9_]+) -->", text))), \
        f"{doc.name}: a marker pair the script cannot parse (each marker on its own line)"
    generated = _generated()
    unknown = sorted(set(found) - set(generated))
    assert not unknown, f"{doc.name}: blocks the generated file has not: {unknown}"
    stale = _mismatches(text, generated)
    assert not stale, (f"{doc.name}: blocks {stale} differ from {GENERATED.relative_to(ROOT)}; "
                       "rerun `python scripts/reproduce_docs.py --render-only` instead of editing them")
    assert REQUIRED.get(doc.name, set()) <= set(found), f"{doc.name} lacks {REQUIRED[doc.name] - set(found)}"


def test_a_hand_edited_number_is_caught():
    generated = _generated()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    body = reproduce_docs.blocks(readme)["table1"]
    number = re.search(r"\d+\.\d\d", body).group(0)
    edited = readme.replace(body, body.replace(number, f"{float(number) + 0.01:.2f}", 1))
    assert _mismatches(readme, generated) == []
    assert _mismatches(edited, generated) == ["table1"]


def test_the_tables_hold_all_twelve_methods_and_five_ratios_each():
    generated = _generated()
    rows = [line for line in generated["table1"].splitlines() if line.startswith("| Tiny-Llama |")]
    assert len(rows) == 13, rows  # the base row and one per method
    sweep = generated["ksweep"]
    for method in ("PIECE-F", "PIECE-S"):
        ratios = set(re.findall(rf"\| {method} \(k=([0-9.e-]+)\) \|", sweep))
        assert len(ratios) >= 5, (method, ratios)
        assert min(map(float, ratios)) <= 0.001 and max(map(float, ratios)) >= 0.05


def test_the_figures_are_the_ones_the_script_copied():
    text = GENERATED.read_text(encoding="utf-8")
    recorded = dict(re.findall(r"Figure: `docs/img/([\w.]+)` .*?sha256 `([0-9a-f]{64})`", text))
    assert "miniature_fig7.png" in recorded
    for name, digest in recorded.items():
        png = ROOT / "docs" / "img" / name
        assert hashlib.sha256(png.read_bytes()).hexdigest() == digest, f"{name} is not the script's last output"
        assert png.stat().st_size < 300_000, f"{name}: {png.stat().st_size} bytes"
