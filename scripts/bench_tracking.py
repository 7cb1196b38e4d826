"""What tracking costs per optimiser step: median wall time of one `Tracker.on_step` (the scalars of a
step, written and flushed to a TensorBoard event file) next to a step of the embedded model's training.

    .venv/bin/python scripts/bench_tracking.py            # prints medians and the ratio
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from piece_cl.tracking import Tracker
from piece_cl.tracking.backends import TensorBoardBackend


def tracker_step_seconds(steps: int = 500) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        tracker = Tracker([TensorBoardBackend(Path(scratch), {"dir": "tb"})])
        stats = {"loss": 1.0, "lr": 1e-3, "grad_norm": torch.tensor(2.0), "samples_per_s": 30.0, "epoch": 1}
        times = []
        for step in range(1, steps + 1):
            started = time.perf_counter()
            tracker.on_step(step, 0, stats, {"ewc_penalty": 0.1}, {"a": 1.0, "b": 2.0})
            times.append(time.perf_counter() - started)
        tracker.close()
    return statistics.median(times)


def model_step_seconds(steps: int = 20) -> float:
    """A training step of a model the size of the embedded miniature (Llama, width 128, 3 layers), batch 8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 2048, (8, 96))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    track, step = tracker_step_seconds(), model_step_seconds()
    print(f"tracker on_step (TensorBoard, flushed): median {track * 1e3:.3f} ms")
    print(f"miniature training step (batch 8):       median {step * 1e3:.1f} ms")
    print(f"ratio tracking / step: {track / step:.4f}")


if __name__ == "__main__":
    main()
