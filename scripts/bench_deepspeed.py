"""PIECE-S vs SeqFT under trainer=deepspeed (ZeRO-2): seconds per optimiser step and the largest peak RSS of a rank,
on 1 and 2 ranks, as ratios PIECE-S / SeqFT. CPU by default; on a GPU node the same runs report samples/s.

    .venv/bin/python scripts/bench_deepspeed.py                      # ~53M-parameter Llama (h640 x 10 layers) (slow on 2 cores)
    .venv/bin/python scripts/bench_deepspeed.py --hidden 128 --layers 2   # a quick look
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "deepspeed_worker.py"


def measure(method: str, ranks: int, shape: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out.pt"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        extra = ["method.ratio=0.001"] if method.startswith("piece") else []
        subprocess.run([*launcher, str(WORKER), str(out), method, "trainer=deepspeed", "trainer.zero_stage=2",
                        *extra, *shape], cwd=ROOT, check=True, capture_output=True)
        result = torch.load(out)[method]
    step = statistics.median(result["step_seconds"])  # steps after each fit's first (which wraps the model)
    return {"s_per_step": step, "samples_per_s": 8 / step,  # global batch 8 in the worker
            "peak_rss_mb_max_rank": max(result["peak_rss_mb"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=10)
    args = parser.parse_args()
    shape = [f"model.arch.hidden_size={args.hidden}", f"model.arch.intermediate_size={args.hidden * 3}",
             f"model.arch.num_hidden_layers={args.layers}", "model.arch.num_attention_heads=8",
             "model.arch.num_key_value_heads=8"]
    report = {}
    for ranks in (1, 2):
        runs = {m: measure(m, ranks, shape) for m in ("seqft", "piece_s")}
        report[f"{ranks}_rank"] = {**runs, "piece_s/seqft step time": runs["piece_s"]["s_per_step"] / runs["seqft"]["s_per_step"],
                                   "piece_s/seqft peak rss": runs["piece_s"]["peak_rss_mb_max_rank"] / runs["seqft"]["peak_rss_mb_max_rank"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
