"""Constants of the memory plan fitted to measurement (scripts/bench_memory.py); one place, with provenance.

The device prediction (a GPU's max_memory_allocated) counts tensors only: weights, state, the activations
autograd saves (counted exactly on the meta device) and the largest transient buffers, with factor 1 —
not yet measured on a GPU (scripts/gpu_check.sh prints plan/measured there).

A CPU process's peak RSS holds more: the library code and kernel caches paged in by the first forward and
backward (CPU_RUNTIME_BYTES, measured as the RSS a ≈0.1M-parameter Llama's importance or step adds above
the post-import baseline: 150-155 MB; a training step's backward and optimiser page in ≈50 MB more), and
glibc's fragmentation of one step's freed activations when the next allocates (CPU_ACTIVATION_FACTOR).
Fitted by hand to bench_memory's 9M, 50M and 200M fp32 points (the 400M and bf16 points validate it);
docs/cluster.md "Memory plan" has the table and the command.
"""
from __future__ import annotations

CPU_RUNTIME_BYTES = {"importance": 150e6, "train": 200e6, "eval": 150e6}
CPU_ACTIVATION_FACTOR = {"importance": 1.0, "train": 1.5, "eval": 1.0}
GPU_ACTIVATION_FACTOR = {"importance": 1.0, "train": 1.0, "eval": 1.0}


def activation_factor(kind: str, on_gpu: bool) -> float:
    return (GPU_ACTIVATION_FACTOR if on_gpu else CPU_ACTIVATION_FACTOR)[kind]


def runtime_bytes(kind: str, on_gpu: bool) -> float:
    return 0.0 if on_gpu else CPU_RUNTIME_BYTES[kind]
