"""TRACE (the paper's 1,000-sample variant): eight tasks in the paper's order, HumanEval as the probe.

Each task directory under `paths.trace_root` holds train/eval/test files in `{"prompt", "answer"}`
form (.json, .jsonl or .json.gz); the instruction template is already inside the prompt.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from piece_cl.data.humaneval import build_humaneval_probe
from piece_cl.data.records import load_records
from piece_cl.data.registry import Benchmark, Task, register_benchmark
from piece_cl.errors import PieceError

TRACE_TASKS = ["C-STANCE", "FOMC", "MeetingBank", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten", "Py150"]
# The authors' generation budgets (docs/paper-notes.md §3): short answers get 16 new tokens, the rest 256.
SHORT_ANSWER_TASKS = {"C-STANCE", "FOMC", "NumGLUE-cm", "NumGLUE-ds"}
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def cfg_get(node: Any, key: str, default: Any = None) -> Any:
    """A key of an optional config node (OmegaConf or dict), `default` when absent or null."""
    if node is None:
        return default
    value = node.get(key, default)
    return default if value is None else value


def find_split_file(task_dir: Path, split: str) -> Path:
    """`<split>.json`, `.jsonl` or `.json.gz` in `task_dir`, whichever exists."""
    for suffix in DATA_SUFFIXES:
        candidate = task_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise PieceError(f"no {split}.json / .jsonl / .json.gz in {task_dir}")


def held_out_sample(records: list[dict], size: int | None, seed: int, name: str) -> list[dict]:
    """A fixed random sample (same seed, same records) for held-out loss curves."""
    if size is None or size >= len(records):
        return records
    rng = random.Random(f"{seed}/{name}/eval")
    return [records[i] for i in sorted(rng.sample(range(len(records)), size))]


def resolve_root(paths_cfg: Any, key: str) -> Path:
    """A configured data root that must exist; the error names the config key to set."""
    value = cfg_get(paths_cfg, key)
    if value is None:
        raise PieceError(f"paths.{key} is not set; point it at the data directory")
    root = Path(str(value)).expanduser()
    if not root.is_dir():
        raise PieceError(f"paths.{key} = {root} does not exist; point it at the data directory")
    return root


def load_trace_task(root: Path, name: str, benchmark_cfg: Any = None, seed: int = 42) -> Task:
    if name not in TRACE_TASKS:
        raise PieceError(f"unknown TRACE task '{name}'; known: {', '.join(TRACE_TASKS)}")
    task_dir = root / name
    if not task_dir.is_dir():
        raise PieceError(f"TRACE task directory {task_dir} not found under paths.trace_root")
    test = load_records(find_split_file(task_dir, "test"), limit=cfg_get(benchmark_cfg, "test_size"))
    eval_records = load_records(find_split_file(task_dir, "eval"))
    return Task(
        name=name,
        metric=name,
        train=load_records(find_split_file(task_dir, "train"), limit=cfg_get(benchmark_cfg, "train_size")),
        eval=held_out_sample(eval_records, cfg_get(benchmark_cfg, "eval_size"), seed, name),
        test=test,
        max_new_tokens=16 if name in SHORT_ANSWER_TASKS else 256,
        meta={"data_dir": str(task_dir)},
    )


@register_benchmark("trace")
def build_trace(cfg) -> Benchmark:
    """The tasks of `benchmark.tasks` (default: all eight, paper order) and the HumanEval probe."""
    root = resolve_root(cfg.paths, "trace_root")
    benchmark_cfg = cfg.benchmark
    seed = int(cfg_get(benchmark_cfg, "seed", cfg_get(cfg, "seed", 42)))
    names = list(cfg_get(benchmark_cfg, "tasks", TRACE_TASKS))
    tasks = [load_trace_task(root, name, benchmark_cfg, seed) for name in names]
    return Benchmark(name="trace", tasks=tasks, probe=build_humaneval_probe(cfg))
