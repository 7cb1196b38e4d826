"""tests/data holds what its MANIFEST says, under 10 MB, and (where the full data is present) is a true
slice of it: whole files byte-identical, cut files their first records."""
import gzip
import hashlib
import json

import pytest

from tests.conftest import SHARED_DATA, VENDORED_DATA

MANIFEST = json.loads((VENDORED_DATA / "MANIFEST.json").read_text())


def stored(rel: str) -> bytes:
    path = VENDORED_DATA / rel
    if path.exists():  # shipped as is (HumanEval's own .gz, its LICENSE)
        return path.read_bytes()
    return gzip.decompress((VENDORED_DATA / (rel + ".gz")).read_bytes())


def test_every_file_matches_the_manifest_and_the_total_is_under_10_mb():
    total = 0
    for rel, entry in MANIFEST.items():
        assert hashlib.sha256(stored(rel)).hexdigest() == entry["sha256"], rel
        total += entry["stored_bytes"]
    on_disk = sum(p.stat().st_size for p in VENDORED_DATA.rglob("*") if p.is_file())
    assert on_disk < 10 * 2**20 and total <= on_disk


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the full data is not here to compare with")
def test_vendored_files_are_slices_of_the_full_data():
    for rel, entry in MANIFEST.items():
        source = (SHARED_DATA / rel).read_bytes()
        assert hashlib.sha256(source).hexdigest() == entry["source_sha256"], f"{rel} changed upstream"
        if entry["kept"] == "all":
            assert stored(rel) == source, rel
        else:
            assert json.loads(stored(rel)) == json.loads(source)[: entry["kept"]], rel
