"""Task and benchmark registries, in the style of lm-evaluation-harness: names map to builders.

A builder is only called when its name is chosen, so a broken optional benchmark (say, one whose
data root is missing) never stops another from running.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from piece_cl.errors import PieceError


@dataclass
class Task:
    """One continual-learning stage: records in TRACE's `{"prompt", "answer"}` format and how to score them."""

    name: str
    metric: str  # a task or metric name understood by evaluation.scorers.score
    train: list[dict]
    eval: list[dict]
    test: list[dict]
    max_new_tokens: int = 256
    meta: dict[str, Any] = field(default_factory=dict)


class Probe(Protocol):
    """A general-ability probe (HumanEval, mini-HumanEval, Flickr30K): one score on 0..100."""

    name: str

    def evaluate(self, model, tokenizer, gen_cfg, shard=None) -> tuple[float, list[dict]]:
        """`shard` (evaluation.sharding.Shard): generate only this rank's share; return everyone's."""


@dataclass
class Benchmark:
    name: str
    tasks: list[Task]
    probe: Probe | None


BenchmarkBuilder = Callable[[Any], Benchmark]
_BENCHMARKS: dict[str, BenchmarkBuilder] = {}
# Modules that register benchmarks when imported; imported lazily so that heavy or broken optional
# dependencies of one benchmark never affect another.
_BENCHMARK_MODULES = {
    "tiny": "piece_cl.data.tiny_tasks",
    "trace": "piece_cl.data.trace",
    "vqa": "piece_cl.data.vqa",
}


def register_benchmark(name: str) -> Callable[[BenchmarkBuilder], BenchmarkBuilder]:
    def decorate(builder: BenchmarkBuilder) -> BenchmarkBuilder:
        _BENCHMARKS[name] = builder
        return builder

    return decorate


def known_benchmarks() -> list[str]:
    return sorted(set(_BENCHMARKS) | set(_BENCHMARK_MODULES))


def build_benchmark(cfg) -> Benchmark:
    """Build the benchmark named by `cfg.benchmark.name` from the whole run config."""
    name = cfg.benchmark.name
    if name not in _BENCHMARKS and name in _BENCHMARK_MODULES:
        import importlib

        importlib.import_module(_BENCHMARK_MODULES[name])
    if name not in _BENCHMARKS:
        raise PieceError(f"unknown benchmark '{name}'; known: {', '.join(known_benchmarks())}")
    benchmark = _BENCHMARKS[name](cfg)
    for task in benchmark.tasks:
        if not task.train:
            raise PieceError(f"task '{task.name}' of benchmark '{name}' has no training records")
        if not task.test:
            raise PieceError(f"task '{task.name}' of benchmark '{name}' has no test records")
    return benchmark
