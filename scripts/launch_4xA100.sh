#!/usr/bin/env bash
# One 4xA100 node, the paper's setting: global batch 64 = 2 per GPU x 8 accumulation x 4 GPUs,
# ZeRO-2 + CPU optimizer offload, bf16 weights with fp32 master, clipping 1.0 (docs/paper-notes.md §3).
# Usage: scripts/launch_4xA100.sh method=piece_s [more overrides]
set -euo pipefail
exec piece-run model=llama3_8b benchmark=trace paths.trace_root="${TRACE_ROOT:-data/trace}" \
  trainer=deepspeed trainer.nproc_per_node=4 trainer.micro_batch_size=2 model.batch_size=64 \
  trainer.zero_stage=2 trainer.offload_optimizer=true trainer.bf16=true "$@"
