"""One rank of a distributed run: `python -m piece_cl.rank RUN_DIR` (started by launch.py via torchrun).

The rank reads RUN_DIR/config.yaml, which the parent composed with Hydra; it never parses Hydra
arguments (a `--local_rank` from the `deepspeed` launcher is accepted and ignored: LOCAL_RANK is in
the environment). Every rank runs the same loop; rank 0 alone prints and writes (run.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from piece_cl.errors import PieceError


def parse(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="piece_cl.rank", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv).run_dir


def main(argv: list[str] | None = None) -> int:
    run_dir = parse(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    from piece_cl.progress import console

    console.quiet = rank != 0
    from piece_cl.run import run
    from piece_cl.training.deepspeed_engine import close_distributed

    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        run(cfg, run_dir)
        close_distributed()
    except PieceError as err:
        if rank == 0:
            print(f"piece-run: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
