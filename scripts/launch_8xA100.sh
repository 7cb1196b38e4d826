#!/usr/bin/env bash
# One 8xA100 node with the paper's global batch 64 = 2 per GPU x 4 accumulation x 8 GPUs (same
# result as 4 GPUs up to summation order: docs/cluster.md). Usage: scripts/launch_8xA100.sh method=piece_s
set -euo pipefail
exec piece-run model=llama3_8b benchmark=trace paths.trace_root="${TRACE_ROOT:-data/trace}" \
  trainer=deepspeed trainer.nproc_per_node=8 trainer.micro_batch_size=2 model.batch_size=64 \
  trainer.zero_stage=2 trainer.offload_optimizer=true trainer.bf16=true "$@"
