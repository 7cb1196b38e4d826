"""Stage checkpoints for resume: the model, the method's state and the engine's step counter.

A stage counts as done only when results.json says so; its checkpoint is written (to a temporary
directory, fsynced, renamed) *before* results.json is replaced, so a kill at any moment leaves either
the previous complete stage or the new one, never a half-written stage that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from piece_cl.errors import PieceError
from piece_cl.io import writing

CHECKPOINTS = "checkpoint"


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_checkpoint(run_dir: Path, t: int) -> Path:
    return run_dir / CHECKPOINTS / f"stage_{t}"


def epoch_checkpoint(run_dir: Path, t: int) -> Path:
    """Where stage t's training keeps its latest epoch (training/epoch_state.py); pruned at the commit."""
    return run_dir / CHECKPOINTS / f"epochs_of_stage_{t}"


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """A temporary directory that replaces `final`, fsynced, only when the block completes."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(final):
            tmp.mkdir(parents=True)
            yield tmp
            _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only holds on to the space that ran out
        raise
    shutil.rmtree(final, ignore_errors=True)  # a stale copy from an attempt that never committed
    os.replace(tmp, final)


def save_stage_state(run_dir: Path, t: int, model, method, engine) -> None:
    final = stage_checkpoint(run_dir, t)
    with atomic_directory(final) as tmp:
        with writing(final / "model.safetensors"):
            save_model(model, str(tmp / "model.safetensors"))
        with writing(final / "method.pt"), open(tmp / "method.pt", "wb") as handle:
            torch.save(method.state_dict(), handle)  # through a Python file: a full disk surfaces as OSError
        (tmp / "engine.json").write_text(json.dumps({"global_step": engine.global_step}))


@contextmanager
def reading(path: Path, advice: str) -> Iterator[None]:
    """A resume-state file that cannot be read (truncated, garbage, missing) becomes one line: which file,
    what went wrong, and `advice` (which stage can still be resumed, or how to restart)."""
    try:
        yield
    except PieceError:
        raise
    except (Exception, RecursionError) as err:  # safetensors, pickle, json, OSError, KeyError, size mismatch...
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise PieceError(f"{path} is unreadable ({detail}); {advice}") from None


def load_stage_state(run_dir: Path, t: int, model, method, engine) -> None:
    path = stage_checkpoint(run_dir, t)
    advice = (f"stage {t + 1}'s checkpoint is the only copy of the trained model, so the run cannot be resumed; "
              f"its results so far stay in {run_dir / 'results.json'}: start again in a new hydra.run.dir")
    with reading(path / "method.pt", advice):
        method.load_state_dict(torch.load(path / "method.pt", weights_only=False))  # may rebuild adapters first
    with reading(path / "model.safetensors", advice):
        load_model(model, str(path / "model.safetensors"))
    with reading(path / "engine.json", advice):
        engine.global_step = int(json.loads((path / "engine.json").read_text())["global_step"])


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Drop every stage checkpoint but `keep` (the last committed stage), and every epoch checkpoint."""
    root = run_dir / CHECKPOINTS
    for path in root.glob("*stage_*"):
        if path.name != f"stage_{keep}":
            shutil.rmtree(path, ignore_errors=True)
