"""The miniature's benchmark: four synthetic tasks (data/tiny_tasks.py) and a mini-HumanEval probe.

Each task is scored like the TRACE task it mirrors: letter choice (FOMC), number answer (NumGLUE),
BLEU/ROUGE-L (MeetingBank, 20Minuten), edit similarity (Py150). Everything is generated from
`benchmark.seed`; train, eval and test never share a prompt.
"""
from __future__ import annotations

from piece_cl.benchmarks.probes import code_probe
from piece_cl.benchmarks.registry import Benchmark, Task, register_benchmark
from piece_cl.data import mini_humaneval
from piece_cl.data.tiny_tasks import unique_records
from piece_cl.errors import PieceError

# name -> (metric, max_new_tokens)
TASKS: dict[str, tuple[str, int]] = {
    "tiny_choice": ("choice", 4),
    "tiny_number": ("number", 6),
    "tiny_rewrite": ("bleu_rouge", 24),
    "tiny_codeline": ("edit_sim", 20),
}


def build_task(name: str, train_size: int, eval_size: int, test_size: int, seed: int) -> Task:
    if name not in TASKS:
        raise PieceError(f"unknown tiny task '{name}'; known: {', '.join(TASKS)}")
    metric, max_new_tokens = TASKS[name]
    records = unique_records(name, train_size + eval_size + test_size, seed)
    return Task(
        name=name,
        metric=metric,
        train=records[:train_size],
        eval=records[train_size:train_size + eval_size],
        test=records[train_size + eval_size:],
        max_new_tokens=max_new_tokens,
    )


@register_benchmark("tiny")
def build_tiny_benchmark(cfg) -> Benchmark:
    """The embedded default: the tasks of `cfg.benchmark.tasks` in order, and mini-HumanEval as probe."""
    bench = cfg.benchmark
    tasks = [build_task(name, bench.train_size, bench.eval_size, bench.test_size, bench.seed) for name in bench.tasks]
    problems = mini_humaneval.probe_problems(bench.probe.n_problems, seed=bench.seed)
    return Benchmark(name=bench.name, tasks=tasks, probe=code_probe(problems, bench.probe, "mini_humaneval"))
