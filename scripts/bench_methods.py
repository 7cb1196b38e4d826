"""Cost of each baseline on a tiny Llama: state held between steps (× model size) and time per step (× SeqFT).

    .venv/bin/python scripts/bench_methods.py

Three tasks of 32 records, batch 8; measured on the third task (two past tasks), plain torch on CPU.
"Held" counts what the method keeps beyond the model: its state_dict tensors, LwF's teacher, and the
Adam state (2 per trainable entry), so SeqFT itself shows 2 × its trainable share.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import methods_kit as kit  # noqa: E402

METHODS = ["seqft", "ewc", "gem", "lwf", "replay", "replay_online", "seqlora", "olora", "layernorm", "migu"]


def tensor_entries(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, dict):
        return sum(tensor_entries(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_entries(v) for v in value)
    return 0


def measure(name: str) -> tuple[float, float, float]:
    torch.manual_seed(0)
    overrides = {"ratio": 0.01} if name == "migu" else {}
    method = kit.method(name, **overrides)
    net = kit.model(layers=4)
    size = sum(p.numel() for p in net.parameters())
    runner = kit.Runner(method, net, tempfile.mkdtemp(), batch_size=8, micro_batch_size=8)
    tasks = [kit.task(n, 32) for n in ("a", "b", "c")]
    for t in range(2):
        runner.stage(t, tasks)
    clock: dict[str, float] = {}

    def before_fit(ctx) -> None:
        clock["fit"] = time.perf_counter()

    def after_fit(ctx, stats) -> None:
        clock["per_step"] = (time.perf_counter() - clock["fit"]) / stats["steps"]
        clock["after"] = time.perf_counter()

    runner.stage(2, tasks, before_fit=before_fit, after_fit=after_fit)  # run.py's stage: before_task -> fit -> after_task
    per_step, after = clock["per_step"], time.perf_counter() - clock["after"]
    trainable = sum(p.numel() for _, p in method.trainable(runner.engine.model))
    teacher = size if name == "lwf" else 0
    held = (tensor_entries(method.state_dict()) + teacher + 2 * trainable) / size
    return held, per_step, after


def main() -> None:
    rows = {name: measure(name) for name in METHODS}
    base = rows["seqft"][1]
    print(f"{'method':<14} {'held (x model)':>15} {'step (x SeqFT)':>15} {'after_task (s)':>15}")
    for name, (held, step, after) in rows.items():
        print(f"{name:<14} {held:>15.3f} {step / base:>15.2f} {after:>15.2f}")


if __name__ == "__main__":
    main()
