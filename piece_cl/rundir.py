"""Guarding a run directory: one run at a time, never deleting another attempt's work.

Three rules (README "Reliability"):
- `RunDirLock` holds an exclusive `fcntl.flock` on RUN_DIR/.lock for the whole attempt; a second
  piece-run into the same directory is refused in one line instead of overwriting the first one's files.
- `created_by_this_attempt` tells a directory Hydra just made for this attempt (empty, its inode changed
  after the process started) from one a user or an earlier, killed attempt left; only the former may be
  removed after a refusal, and only while `holds_committed_work` is false.
- `check_run_dir` decides, before anything is written, whether the directory is fresh, resumable (same
  config) or finished, and refuses unreadable resume state naming the file and what can still be done.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from piece_cl.checkpoint import CHECKPOINTS
from piece_cl.errors import PieceError

LOCK_NAME = ".lock"


class RunDirLock:
    """An exclusive, non-blocking flock on RUN_DIR/.lock; released when the attempt ends (or the process dies)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self.fd)
            self.fd = None
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PieceError(f"another piece-run is using {self.path.parent} (it holds {self.path}); wait for it "
                                 "to finish or choose another hydra.run.dir") from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def created_by_this_attempt(run_dir: Path, started: float) -> bool:
    """True for the empty directory Hydra made for this attempt: nothing in it, inode changed after `started`."""
    try:
        return not any(run_dir.iterdir()) and run_dir.stat().st_ctime >= started
    except OSError:
        return False


def holds_committed_work(run_dir: Path) -> bool:
    """results.json (a committed stage) or any stage/epoch checkpoint: something a rerun could resume from."""
    checkpoints = run_dir / CHECKPOINTS
    return (run_dir / "results.json").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def remove_if_ours(run_dir: Path, ours: bool) -> None:
    """After a refusal: drop the directory only when this attempt made it and committed nothing into it."""
    if ours and run_dir.is_dir() and not holds_committed_work(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def read_results_json(run_dir: Path) -> dict:
    """results.json as a dict, or a one-line refusal saying the committed R matrix is lost and how to go on."""
    path = run_dir / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("R"), list) or not isinstance(data.get("tasks"), list):
            raise ValueError("not a results object with R and tasks")
    except (ValueError, OSError) as err:
        stages = sorted(p.name for p in (run_dir / CHECKPOINTS).glob("stage_*"))
        kept = f" ({stages[-1]} is still there, but without the R matrix it cannot be resumed)" if stages else ""
        raise PieceError(f"{path} is corrupted ({str(err).splitlines()[0]}){kept}; restore it from a copy, or "
                         "start again in a new hydra.run.dir (this directory is left as it is)") from None
    return data


def check_run_dir(cfg: DictConfig, run_dir: Path, compare) -> bool:
    """True when the directory holds a finished run that resume=true asked to show.

    A directory holding an unfinished run with the same config is continued (resume); a finished run is
    never overwritten; a different config is refused. `compare(stored, cfg)` returns the first difference.
    """
    config_file, results_file = run_dir / "config.yaml", run_dir / "results.json"
    if not results_file.exists():
        if config_file.exists():
            _check_same_config(cfg, run_dir, compare, stages_done=0)
        return False
    finished = read_results_json(run_dir)
    stages_done = len(finished["R"])
    if stages_done == len(finished["tasks"]):
        if cfg.resume:
            return True
        raise PieceError(f"{run_dir} already holds a finished run; choose another hydra.run.dir")
    if not config_file.exists():
        raise PieceError(f"{run_dir} holds results.json but no config.yaml; refusing to guess what it was")
    _check_same_config(cfg, run_dir, compare, stages_done)
    return False


def _check_same_config(cfg: DictConfig, run_dir: Path, compare, stages_done: int) -> None:
    path = run_dir / "config.yaml"
    try:
        stored = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if not isinstance(stored, dict):
            raise ValueError("not a mapping")
    except Exception as err:  # yaml.YAMLError, OmegaConf errors, UnicodeDecodeError, OSError
        committed = f"{stages_done} committed stage(s) are kept" if stages_done else "no stage was committed"
        raise PieceError(f"{path} is corrupted ({str(err).splitlines()[0]}); {committed}: restore config.yaml from a "
                         "copy to resume, or start again in a new hydra.run.dir") from None
    difference = compare(stored, OmegaConf.to_container(cfg, resolve=True))
    if difference:
        raise PieceError(f"{run_dir} holds a run with a different config ({difference}); choose another hydra.run.dir")
