#!/usr/bin/env bash
# Figure 7 on SLURM: one job per sparsity ratio k, each on a whole 8-GPU node that starts its own ranks.
# Usage: PIECE_OUTPUT_ROOT=/shared/outputs TRACE_ROOT=/shared/TRACE scripts/slurm_k_sweep.sh [hydra.launcher.partition=gpu]
set -euo pipefail
exec piece-run -m hydra/launcher=slurm experiment=fig7_k_sweep model=llama3_8b benchmark=trace \
  paths.trace_root="${TRACE_ROOT:-data/trace}" \
  method.ratio=0.0001,0.0005,0.001,0.005,0.01,0.05 \
  trainer=deepspeed trainer.nproc_per_node=8 trainer.micro_batch_size=2 model.batch_size=64 "$@"
