"""TRACE (the paper's 1,000-sample variant): eight tasks in the paper's order, HumanEval as the probe.

Each task directory under `paths.trace_root` holds train/eval/test files in `{"prompt", "answer"}`
form (.json, .jsonl or .json.gz); the instruction template is already inside the prompt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from piece_cl.benchmarks.probes import code_probe
from piece_cl.benchmarks.registry import Benchmark, Task, benchmark_seed, cfg_get, register_benchmark, resolve_root
from piece_cl.data.humaneval import load_humaneval
from piece_cl.data.records import find_split_file, held_out_sample, load_records
from piece_cl.errors import PieceError
from piece_cl.evaluation.code_probe import CodeProbe

TRACE_TASKS = ["C-STANCE", "FOMC", "MeetingBank", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten", "Py150"]
# The authors' generation budgets (docs/paper-notes.md §3): short answers get 16 new tokens, the rest 256.
SHORT_ANSWER_TASKS = {"C-STANCE", "FOMC", "NumGLUE-cm", "NumGLUE-ds"}


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


def build_humaneval_probe(cfg: Any) -> CodeProbe:
    """The probe as the authors ran it: raw prompt, 128 new tokens, 5 s per problem, blank-line cut."""
    probe_cfg = cfg_get(cfg.benchmark, "probe", {})
    problems = load_humaneval(cfg.paths.get("humaneval_path"), cfg_get(probe_cfg, "n_problems"))
    return code_probe(problems, probe_cfg, "humaneval")


@register_benchmark("trace")
def build_trace(cfg) -> Benchmark:
    """The tasks of `benchmark.tasks` (default: all eight, paper order) and the HumanEval probe."""
    root = resolve_root(cfg.paths, "trace_root")
    seed = benchmark_seed(cfg)
    names = list(cfg_get(cfg.benchmark, "tasks", TRACE_TASKS))
    tasks = [load_trace_task(root, name, cfg.benchmark, seed) for name in names]
    return Benchmark(name="trace", tasks=tasks, probe=build_humaneval_probe(cfg))
