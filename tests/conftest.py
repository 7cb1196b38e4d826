"""Shared fixtures: the real benchmark data beside the repo, offline hub, tiny models."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data relative to the project root (CI lays shared/ beside the clone); overridable.
SHARED_DATA = Path(os.environ.get("PIECE_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"benchmark data not found at {SHARED_DATA} (set PIECE_SHARED_DATA)")
    return SHARED_DATA

# The pretrained miniature is cached once per checkout (.cache/ is git-ignored) and shared by every
# test that runs the embedded benchmark; a fresh clone pretrains it once.
os.environ.setdefault("PIECE_CACHE_DIR", str(ROOT / ".cache" / "piece_cl"))
