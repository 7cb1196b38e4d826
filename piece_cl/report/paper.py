"""The paper's Tables 1 and 2 (shipped as package data) and the run-name -> paper-name mapping.

Runs are named by config keys (`llama3_8b`, `piece_s`); the paper prints `Llama3-8B`, `PIECE-S`. The
paper name of a model or method is its config's `paper_name` (configs/model/*.yaml, configs/method/*.yaml),
read from the run's own config.yaml, else from the shipped configs; nothing here repeats those names.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

BASE = "base"  # the paper tables' row of the model before any task (not a method config)


@lru_cache(maxsize=None)
def config_paper_names(group: str) -> dict[str, str]:
    """{config name: paper_name} of every option of a config group (`model`, `method`) that has one."""
    names = {}
    for entry in sorted(resources.files("piece_cl.configs").joinpath(group).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            node = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
            if isinstance(node.get("paper_name"), str):
                names[str(node.get("name", entry.name[:-5]))] = node["paper_name"]
    return names


def _paper_order(column: str) -> list[str]:
    """Names in the order the paper's tables list them (Table 1, then Table 2)."""
    order: dict[str, None] = {}
    for _, filename in BENCHMARK_TABLES.values():
        if filename:
            text = resources.files("piece_cl.report").joinpath("data", filename).read_text(encoding="utf-8")
            order.update(dict.fromkeys(rec[column] for rec in csv.DictReader(io.StringIO(text))))
    return list(order)


def _ordered(group: str, column: str) -> dict[str, str]:
    """{config name: paper name} in paper order, then the configs the paper does not have."""
    names = config_paper_names(group)
    rank = {name: index for index, name in enumerate(_paper_order(column))}
    return dict(sorted(names.items(), key=lambda item: (rank.get(item[1], len(rank)), item[1])))


PROBE_NAMES = {
    "humaneval": "HumanEval",
    "humaneval_pass@1": "HumanEval",
    "mini_humaneval": "mini-HumanEval",
    "mini_humaneval_pass@1": "mini-HumanEval",
    "flickr30k": "Flickr30k",
}
# benchmark -> (table number, shipped CSV or None)
BENCHMARK_TABLES = {"trace": (1, "table1.csv"), "vqa": (2, "table2.csv"), "tiny": (1, None)}
OP_TOLERANCE = 0.05  # printed values have two decimals; a mean of them is off by < 0.005 from rounding
MODEL_NAMES = _ordered("model", "model")  # paper order: tables list models and methods in this order
METHOD_NAMES = {BASE: BASE, **_ordered("method", "method")}


def model_name(name: str) -> str:
    """Paper name of a model config; unknown names pass through unchanged."""
    return MODEL_NAMES.get(name, name)


def method_name(name: str) -> str:
    """Paper name of a method config; unknown names pass through unchanged."""
    return METHOD_NAMES.get(name, name)


def probe_name(name: str) -> str:
    return PROBE_NAMES.get(name, name)


def sort_key(model: str, method: str) -> tuple[int, str, int, str]:
    """Paper order for (paper model name, paper method name); unknown names go last, alphabetically."""
    models = list(MODEL_NAMES.values())
    methods = list(METHOD_NAMES.values())
    model_rank = models.index(model) if model in models else len(models)
    method_rank = methods.index(method) if method in methods else len(methods)
    return model_rank, model, method_rank, method


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's result tables: probe column, task columns, and values per (model, method)."""

    number: int
    probe: str
    tasks: list[str]
    rows: dict[tuple[str, str], dict[str, float | None]]

    def get(self, model: str, method: str) -> dict[str, float | None] | None:
        return self.rows.get((model, method))


@dataclass(frozen=True)
class OpMismatch:
    """A paper row whose printed OP is not the mean of its own task columns."""

    model: str
    method: str
    printed: float
    row_mean: float


def _parse(text: str, number: int) -> PaperTable:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    probe, tasks = header[2], header[3:-2]
    rows = {
        (rec["model"], rec["method"]): {col: float(rec[col]) if rec[col] else None for col in header[2:]}
        for rec in reader
    }
    return PaperTable(number=number, probe=probe, tasks=tasks, rows=rows)


def load_paper_table(benchmark: str) -> PaperTable | None:
    """The paper's table for a benchmark (`trace` -> Table 1, `vqa` -> Table 2), None if it has none."""
    number, filename = BENCHMARK_TABLES.get(benchmark, (None, None))
    if filename is None:
        return None
    text = resources.files("piece_cl.report").joinpath("data", filename).read_text(encoding="utf-8")
    return _parse(text, number)


def inconsistent_op_rows(table: PaperTable, tolerance: float = OP_TOLERANCE) -> list[OpMismatch]:
    """Rows whose printed OP differs from the mean of their task columns by more than `tolerance`."""
    mismatches = []
    for (model, method), values in table.rows.items():
        scores = [values[task] for task in table.tasks]
        if values["OP"] is None or any(score is None for score in scores):
            continue
        row_mean = sum(scores) / len(scores)
        if abs(row_mean - values["OP"]) > tolerance:
            mismatches.append(OpMismatch(model, method, values["OP"], row_mean))
    return mismatches
