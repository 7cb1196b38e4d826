"""Task and benchmark registries, in the style of lm-evaluation-harness: names map to builders.

A builder is only called when its name is chosen, so a broken optional benchmark (say, one whose
data root is missing) never stops another from running.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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
    "tiny": "piece_cl.benchmarks.tiny",
    "trace": "piece_cl.benchmarks.trace",
    "vqa": "piece_cl.benchmarks.vqa",
}


def cfg_get(node: Any, key: str, default: Any = None) -> Any:
    """A key of an optional config node (OmegaConf or dict), `default` when absent or null."""
    if node is None:
        return default
    value = node.get(key, default)
    return default if value is None else value


def resolve_root(paths_cfg: Any, key: str) -> Path:
    """A configured data root that must exist; the error names the config key to set."""
    value = cfg_get(paths_cfg, key)
    if value is None:
        raise PieceError(f"paths.{key} is not set; point it at the data directory")
    root = Path(str(value)).expanduser()
    if not root.is_dir():
        raise PieceError(f"paths.{key} = {root} does not exist; point it at the data directory")
    return root


def benchmark_seed(cfg) -> int:
    """`benchmark.seed` (held-out samples), else the run's seed."""
    return int(cfg_get(cfg.benchmark, "seed", cfg_get(cfg, "seed", 42)))


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
