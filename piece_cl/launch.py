"""Parent side of a distributed run: record the layout in config.yaml, start the ranks with torchrun.

Hydra composes in the parent only (cli.py writes RUN_DIR/config.yaml); the ranks read that file
(rank.py), so no rank parses Hydra arguments or opens a run directory of its own. A SLURM job from
`hydra/launcher=slurm` is one task per node that calls this, so the job starts its own ranks.

On more than one node (`trainer.nnodes`) every node runs `piece-run` with the same arguments and the
same run directory on a shared file system. The first node (`trainer.node_rank` 0, or SLURM_NODEID 0)
prepares the directory as on one node; the others wait for its config.yaml to name their rendezvous
(`join`), then start their ranks, and torchrun's c10d rendezvous joins them into one world.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from piece_cl.errors import PieceError
from piece_cl.io import atomic_write_text
from piece_cl.results import RunResults
from piece_cl.training.deepspeed_engine import accumulation_steps


def world_size(trainer_cfg) -> int:
    nnodes, nproc = int(trainer_cfg.get("nnodes", 1)), int(trainer_cfg.nproc_per_node)
    if nnodes < 1 or nproc < 1:
        raise PieceError(f"trainer.nnodes and trainer.nproc_per_node must be at least 1, got {nnodes} and {nproc}")
    return nnodes * nproc


def node_rank(trainer_cfg) -> int:
    """This node's place: `trainer.node_rank`, else SLURM's node id, else 0 (one node)."""
    if int(trainer_cfg.get("nnodes", 1)) == 1:
        return 0
    explicit = trainer_cfg.get("node_rank")
    return int(explicit if explicit is not None else os.environ.get("SLURM_NODEID", 0))


def rendezvous_endpoint(trainer_cfg) -> str:
    """HOST:PORT of the c10d rendezvous: `trainer.rdzv_endpoint`, else the first node of a SLURM job."""
    if trainer_cfg.get("rdzv_endpoint"):
        return str(trainer_cfg.rdzv_endpoint)
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if nodelist and shutil.which("scontrol"):
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True).stdout
        if hosts.split():
            return f"{hosts.split()[0]}:{int(trainer_cfg.get('master_port') or 29500)}"
    raise PieceError(f"trainer.nnodes={trainer_cfg.nnodes} needs trainer.rdzv_endpoint=HOST:PORT "
                     "(the first node's address, reachable from every node)")


def rendezvous_id(trainer_cfg, run_dir: Path) -> str:
    """The same on every node of one job: `trainer.rdzv_id`, SLURM's job id, or the run directory's hash."""
    explicit = trainer_cfg.get("rdzv_id") or os.environ.get("SLURM_JOB_ID")
    return str(explicit) if explicit else "piece-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def torchrun_command(trainer_cfg, run_dir: Path) -> list[str]:
    nproc = int(trainer_cfg.nproc_per_node)
    nnodes = int(trainer_cfg.get("nnodes", 1))
    if nnodes > 1:
        rendezvous = [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rendezvous_endpoint(trainer_cfg)}",
                      f"--rdzv_id={rendezvous_id(trainer_cfg, run_dir)}"]
    elif trainer_cfg.master_port is None:
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={int(trainer_cfg.master_port)}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
            "-m", "piece_cl.rank", str(run_dir)]


def record_layout(cfg: DictConfig, run_dir: Path) -> None:
    """Add world size, accumulation and ZeRO stage to config.yaml (cli.py wrote the rest)."""
    from piece_cl.training.deepspeed_engine import use_bf16

    trainer = cfg.trainer
    world = world_size(trainer)
    nnodes = int(trainer.get("nnodes", 1))
    stored = OmegaConf.load(run_dir / "config.yaml")
    stored.world_size = world
    stored.distributed = {
        "launcher": "torchrun", "nproc_per_node": int(trainer.nproc_per_node), "nnodes": nnodes,
        "rdzv_endpoint": rendezvous_endpoint(trainer) if nnodes > 1 else None,
        "rdzv_id": rendezvous_id(trainer, run_dir) if nnodes > 1 else None,
        "micro_batch_size": int(trainer.micro_batch_size), "accumulation": accumulation_steps(trainer, world),
        "global_batch": int(trainer.batch_size), "zero_stage": int(trainer.zero_stage),
        "offload_optimizer": bool(trainer.offload_optimizer), "offload_param": bool(trainer.offload_param),
        "bf16": use_bf16(trainer), "accelerator": "cuda" if torch.cuda.is_available() else "cpu",
    }
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(stored))


def launch(cfg: DictConfig, run_dir: Path) -> RunResults:
    """Run every rank (of this node) to the end; the results are what rank 0 wrote."""
    record_layout(cfg, run_dir)
    return _run_ranks(cfg, run_dir)


def join(cfg: DictConfig, run_dir: Path, poll_s: float = 0.5) -> RunResults:
    """A node after the first: wait for the first node's config.yaml to name this job, then run its ranks.

    It never writes into the run directory: the first node prepared it, and rank 0 writes its results.
    """
    trainer = cfg.trainer
    accumulation_steps(trainer, world_size(trainer))  # the batch check of the first node, before waiting
    wanted = rendezvous_id(trainer, run_dir)
    deadline = time.monotonic() + 60 * float(trainer.get("dist_timeout_min", 120))
    config_file = run_dir / "config.yaml"
    while OmegaConf.select(_load_or_empty(config_file), "distributed.rdzv_id") != wanted:
        if time.monotonic() > deadline:
            raise PieceError(f"node {node_rank(trainer)}: the first node did not prepare {run_dir} for rendezvous "
                             f"'{wanted}' within trainer.dist_timeout_min={trainer.dist_timeout_min}; start it with "
                             "the same arguments and a run directory both nodes share")
        time.sleep(poll_s)
    return _run_ranks(cfg, run_dir)


def _load_or_empty(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except (OSError, ValueError):  # not written yet (or mid-replace on a network file system)
        return OmegaConf.create({})


def _run_ranks(cfg: DictConfig, run_dir: Path) -> RunResults:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    returncode = subprocess.run(torchrun_command(cfg.trainer, run_dir), env=env).returncode
    from piece_cl.results import load_results

    results = load_results(run_dir)
    if returncode != 0 or results is None or not results.finished:
        raise PieceError(f"the ranks stopped with exit status {returncode}; see their messages above")
    return results
