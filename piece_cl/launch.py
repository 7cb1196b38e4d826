"""Parent side of a distributed run: record the layout in config.yaml, start the ranks with torchrun.

Hydra composes in the parent only (cli.py writes RUN_DIR/config.yaml); the ranks read that file
(rank.py), so no rank parses Hydra arguments or opens a run directory of its own. A SLURM job from
`hydra/launcher=slurm` is one task per node that calls this, so the job starts its own ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from piece_cl.errors import PieceError
from piece_cl.io import atomic_write_text
from piece_cl.results import RunResults


def torchrun_command(trainer_cfg, run_dir: Path) -> list[str]:
    nproc = int(trainer_cfg.nproc_per_node)
    rendezvous = (["--standalone"] if trainer_cfg.master_port is None
                  else ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={int(trainer_cfg.master_port)}"])
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
            "-m", "piece_cl.rank", str(run_dir)]


def record_layout(cfg: DictConfig, run_dir: Path) -> None:
    """Add world size, accumulation and ZeRO stage to config.yaml (cli.py wrote the rest)."""
    from piece_cl.training.deepspeed_engine import accumulation_steps, use_bf16

    trainer = cfg.trainer
    world = int(trainer.nproc_per_node)
    if world < 1:
        raise PieceError(f"trainer.nproc_per_node must be at least 1, got {world}")
    stored = OmegaConf.load(run_dir / "config.yaml")
    stored.world_size = world
    stored.distributed = {
        "launcher": "torchrun", "nproc_per_node": world, "nnodes": 1,
        "micro_batch_size": int(trainer.micro_batch_size), "accumulation": accumulation_steps(trainer, world),
        "global_batch": int(trainer.batch_size), "zero_stage": int(trainer.zero_stage),
        "offload_optimizer": bool(trainer.offload_optimizer), "offload_param": bool(trainer.offload_param),
        "bf16": use_bf16(trainer), "accelerator": "cuda" if torch.cuda.is_available() else "cpu",
    }
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(stored))


def launch(cfg: DictConfig, run_dir: Path) -> RunResults:
    """Run every rank to the end; the results are what rank 0 wrote."""
    record_layout(cfg, run_dir)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    returncode = subprocess.run(torchrun_command(cfg.trainer, run_dir), env=env).returncode
    from piece_cl.results import load_results

    results = load_results(run_dir)
    if returncode != 0 or results is None or not results.finished:
        raise PieceError(f"the ranks stopped with exit status {returncode}; see their messages above")
    return results
