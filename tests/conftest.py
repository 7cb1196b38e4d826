"""Shared fixtures: the real benchmark data (full copy or the vendored slices), offline hub, tiny models."""
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The full data: $PIECE_SHARED_DATA, else ../shared/data beside the clone. Without either, the slices
# the tests read, vendored in tests/data (scripts/vendor_test_data.py, tests/data/README.md).
SHARED_DATA = Path(os.environ["PIECE_SHARED_DATA"]) if os.environ.get("PIECE_SHARED_DATA") else ROOT.parent / "shared" / "data"
VENDORED_DATA = ROOT / "tests" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# A two-task, four-problem run of the embedded benchmark: the shortest real piece-run.
SHORT_RUN = ["experiment=smoke", "benchmark.tasks=[tiny_choice,tiny_number]", "benchmark.probe.n_problems=4"]


def run_embedded(run_dir, *extra, kill_at=None) -> subprocess.CompletedProcess:
    """`piece-run SHORT_RUN EXTRA` into run_dir in a fresh process; `kill_at` arms piece_cl/faults.py."""
    env = {k: v for k, v in os.environ.items() if k != "PIECE_KILL_AT"}
    env["HF_HUB_OFFLINE"] = "1"
    if kill_at:
        env["PIECE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "piece_cl.cli", *SHORT_RUN, f"hydra.run.dir={run_dir}", *extra],
                          env=env, capture_output=True, text=True, timeout=900)


def compose_config(overrides=(), hydra: bool = False):
    """The run config `piece-run OVERRIDES` would compose (the one helper every test file uses)."""
    from hydra import compose, initialize_config_dir

    from piece_cl.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def unpack_vendored(destination: Path) -> Path:
    """tests/data with every `x.gz` written out as `x` (HumanEval stays gzipped, as shipped): the
    layout and file names of the full data, so a test cannot tell which one it reads."""
    for source in sorted(VENDORED_DATA.rglob("*")):
        rel = source.relative_to(VENDORED_DATA)
        if not source.is_file() or rel.parts[0] not in ("trace", "vqa_v2", "flickr30k", "humaneval"):
            continue
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".gz" and rel.parts[0] != "humaneval":
            with gzip.open(source, "rb") as packed, open(target.with_suffix(""), "wb") as out:
                shutil.copyfileobj(packed, out)
        else:
            shutil.copyfile(source, target)
    return destination


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if os.environ.get("PIECE_SHARED_DATA"):
        pytest.fail(f"PIECE_SHARED_DATA={SHARED_DATA} is not a directory (unset it to use the vendored tests/data)")
    return unpack_vendored(tmp_path_factory.mktemp("vendored_data"))

# The pretrained miniature is cached once per checkout (.cache/ is git-ignored) and shared by every
# test that runs the embedded benchmark; a fresh clone pretrains it once.
os.environ.setdefault("PIECE_CACHE_DIR", str(ROOT / ".cache" / "piece_cl"))

# Pretrains the default miniature in a child process, so that the test process's RNG and
# transformers state stay as they were (models loaded concurrently in one process came back untied).
_PRETRAIN = """
from hydra import compose, initialize_config_dir
from piece_cl.cli import CONFIG_DIR
from piece_cl.models.pretrain import load_miniature
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    config = compose(config_name="config")
load_miniature(config.model, config.paths.cache_dir)
"""


@pytest.fixture(scope="session", autouse=True)
def pretrained_miniature() -> None:
    """The default miniature, pretrained before the first test (a no-op once it is cached).

    A fresh clone would otherwise pretrain it inside whichever test needs it first, under that test's
    timeout: on a loaded 2-core machine test_full_disk_mid_run… timed out at 300 s doing so.
    """
    from piece_cl.models.pretrain import is_pretrained

    config = compose_config()
    if not is_pretrained(config.model, config.paths.cache_dir):
        subprocess.run([sys.executable, "-c", _PRETRAIN], cwd=ROOT, check=True, timeout=1800)
