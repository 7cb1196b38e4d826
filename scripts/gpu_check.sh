#!/usr/bin/env bash
# The GPU check (issue 12, item 5), < 8 minutes on one H200/A100:
#   1. a Llama3-8B-shaped random bf16 model: PIECE-S importance on 64 samples x 1024 tokens and 20 PIECE-S steps,
#      torch.cuda.max_memory_allocated per phase beside the memory plan's prediction, and samples/s
#      (scripts/gpu_check.py);
#   2. the importance benchmark on the GPU: estimate vs the batch-1 loop (scripts/bench_importance.py).
#   scripts/gpu_check.sh                  # on the GPU machine, from the repository root
#   GPU_CHECK_TINY=1 scripts/gpu_check.sh # the same code at a tiny size (CPU when no GPU; seconds)
# Output: stdout, and the JSON lines under ${GPU_CHECK_OUT:-outputs/gpu_check}/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
"$PY" scripts/gpu_check.py | tee "$OUT/gpu_check.txt"
if [[ "${GPU_CHECK_TINY:-0}" != "0" ]]; then
  "$PY" scripts/bench_importance.py --hidden 64 --layers 2 --vocab 512 --samples 8 --tokens 32 --chunk 4 --repeats 1 --paths hooks,loop \
    | tee "$OUT/bench_importance.txt"
else
  "$PY" scripts/bench_importance.py --hidden 1024 --layers 8 --vocab 32000 --samples 64 --tokens 512 --chunk 8 --repeats 3 \
    | tee "$OUT/bench_importance.txt"
fi
