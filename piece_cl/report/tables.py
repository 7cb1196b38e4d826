"""Tables 1 and 2 from runs: one row per (model, method), the paper's value and our difference beside ours.

OP is recomputed from the task columns shown (the mean of the final R row), BWT from the R matrix with
the convention chosen (`all`: after the last task, the paper's formula; `authors`: after task T-1, what
the authors' tables print). Best value per column within each model is bold, as in the paper.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass

from piece_cl.evaluation.metrics import bwt
from piece_cl.report.paper import (
    BENCHMARK_TABLES,
    OpMismatch,
    PaperTable,
    inconsistent_op_rows,
    load_paper_table,
    probe_name,
    sort_key,
)
from piece_cl.report.runs import Run, method_labels

BWT_CONVENTIONS = {
    "all": "BWT after the last task T over all earlier tasks, (1/T) Σ_{i<T} (R_{T,i} − R_{i,i}) (the paper's formula)",
    "authors": "BWT after task T−1, the last task excluded, (1/(T−1)) Σ_{i<T−1} (R_{T−1,i} − R_{i,i}) "
    "(what the authors' tables print)",
}
OTHER_CONVENTION = {"all": "authors", "authors": "all"}


def final_bwt(R: list[list[float]], n_tasks: int, convention: str) -> float | None:
    """BWT of a run under a convention; None when the run has not reached the stage it needs."""
    if convention not in BWT_CONVENTIONS:
        raise ValueError(f"unknown BWT convention {convention!r}")
    if not R:
        return None
    values = bwt(R)
    if convention == "all":
        return values[-1]
    index = n_tasks - 2
    return values[index] if 0 <= index < len(values) else None


@dataclass
class Row:
    model: str
    method: str                           # the paper's method name
    values: dict[str, float | None]      # column -> our value
    paper: dict[str, float | None] | None
    run: str = ""                         # run folder name ("" for the base row)
    complete: bool = True
    label: str = ""                       # shown: the method, + k or run name when several runs share it

    def __post_init__(self) -> None:
        self.label = self.label or self.method

    @property
    def is_base(self) -> bool:
        return self.method == "base"


@dataclass
class Table:
    benchmark: str
    number: int | None
    probe: str
    tasks: list[str]
    rows: list[Row]
    bwt_convention: str
    paper_flags: list[OpMismatch]

    @property
    def columns(self) -> list[str]:
        return [self.probe, *self.tasks, "OP", "BWT"]

    @property
    def has_paper(self) -> bool:
        return any(row.paper for row in self.rows)

    @property
    def title(self) -> str:
        number = f"Table {self.number}" if self.number else "Table"
        return f"{number} ({self.benchmark})"

    @property
    def stem(self) -> str:
        return f"table{self.number or ''}_{self.benchmark}"

    def flagged(self, row: Row) -> bool:
        return any(f.model == row.model and f.method == row.method for f in self.paper_flags)

    def best(self) -> set[tuple[int, str]]:
        """(row index, column) of the best value per column among each model's method rows (2 or more)."""
        best: set[tuple[int, str]] = set()
        by_model: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(self.rows):
            if not row.is_base:
                by_model[row.model].append(index)
        for indices in by_model.values():
            if len(indices) < 2:
                continue  # nothing to compare with
            for column in self.columns:
                scored = [(self.rows[i].values.get(column), i) for i in indices]
                scored = [(v, i) for v, i in scored if v is not None]
                if scored:
                    top = max(v for v, _ in scored)
                    best.update((i, column) for v, i in scored if v == top)
        return best


def _run_row(run: Run, tasks: list[str], probe: str, convention: str, paper: PaperTable | None,
             label: str) -> Row:
    R = run.R
    final = dict(zip(run.tasks, R[-1])) if R else {}
    scores = {task: final.get(task) for task in tasks}
    seen = [v for v in scores.values() if v is not None]
    after = run.probe.get("after_task") or []
    values = {
        probe: after[-1] if after else None,
        **scores,
        "OP": sum(seen) / len(seen) if seen else None,
        "BWT": final_bwt(R, len(run.tasks), convention),
    }
    paper_values = _paper_values(paper, run.model, run.method, probe)
    return Row(run.model, run.method, values, paper_values, run=run.name, complete=run.complete, label=label)


def _paper_values(paper: PaperTable | None, model: str, method: str, probe: str) -> dict[str, float | None] | None:
    values = paper.get(model, method) if paper else None
    if values is None:
        return None
    return {probe if column == paper.probe else column: value for column, value in values.items()}


def build_table(benchmark: str, runs: list[Run], convention: str) -> Table:
    """One table for the runs of one benchmark, rows in the paper's order, a base row per model."""
    paper = load_paper_table(benchmark)
    tasks = list(dict.fromkeys(task for run in runs for task in run.tasks))
    probe_names = {run.probe.get("name") for run in runs if run.probe.get("name")}
    probe = paper.probe if paper else probe_name(sorted(probe_names)[0]) if probe_names else "probe"
    runs = sorted(runs, key=lambda run: (sort_key(run.model, run.method), run.ratio or 0.0, run.name))
    labels = method_labels(runs)
    rows = [_run_row(run, tasks, probe, convention, paper, labels[run.path]) for run in runs]
    with_base: list[Row] = []
    for index, row in enumerate(rows):
        if index == 0 or rows[index - 1].model != row.model:
            base = runs[index].probe.get("base")
            values = {probe: base, **{c: None for c in [*tasks, "OP", "BWT"]}}
            with_base.append(Row(row.model, "base", values, _paper_values(paper, row.model, "base", probe)))
        with_base.append(row)
    number = BENCHMARK_TABLES.get(benchmark, (None, None))[0]
    flags = inconsistent_op_rows(paper) if paper else []
    return Table(benchmark, number, probe, tasks, with_base, convention, flags)


def build_tables(runs: list[Run], convention: str = "all") -> list[Table]:
    by_benchmark: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_benchmark[run.benchmark].append(run)
    return [build_table(name, group, convention) for name, group in sorted(by_benchmark.items())]


# ---------------------------------------------------------------- rendering

def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _paper_note(table: Table, row: Row, column: str, value: float | None) -> str | None:
    """'paper; ours − paper' text for a cell, or None when the paper has no value there."""
    paper = row.paper.get(column) if row.paper else None
    if paper is None:
        return None
    mark = "†" if column == "OP" and table.flagged(row) else ""
    diff = "" if value is None else f"; {value - paper:+.2f}"
    return f"{paper:.2f}{mark}{diff}"


def _notes(table: Table, with_paper: bool) -> list[str]:
    notes = [f"BWT shown: {BWT_CONVENTIONS[table.bwt_convention]}. "
             f"Other convention: `--bwt {OTHER_CONVENTION[table.bwt_convention]}`.",
             "OP is recomputed as the mean of the task columns shown; bold marks the best value per column "
             "within each model."]
    if with_paper and table.has_paper:
        notes.append("Cells read `ours (paper; ours − paper)`.")
    for flag in table.paper_flags if with_paper else []:
        notes.append(f"† Paper row {flag.model} {flag.method}: printed OP {flag.printed:.2f}, "
                     f"but the mean of its task columns is {flag.row_mean:.2f}.")
    incomplete = [row.run for row in table.rows if not row.complete]
    if incomplete:
        notes.append("Incomplete runs (scores after the last finished stage): " + ", ".join(incomplete) + ".")
    return notes


def to_markdown(table: Table, with_paper: bool = True) -> str:
    best = table.best()
    lines = [f"**{table.title}**", "", "| Model | Method | " + " | ".join(table.columns) + " |",
             "|---|---|" + "---:|" * len(table.columns)]
    for index, row in enumerate(table.rows):
        cells = []
        for column in table.columns:
            value = row.values.get(column)
            text = _number(value)
            if (index, column) in best:
                text = f"**{text}**"
            note = _paper_note(table, row, column, value) if with_paper else None
            cells.append(f"{text} ({note})" if note else text)
        lines.append(f"| {row.model} | {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in _notes(table, with_paper)]) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(char, escaped)
    return text


def to_latex(table: Table, with_paper: bool = True) -> str:
    """A booktabs tabular; needs \\usepackage{booktabs}."""
    best = table.best()
    header = " & ".join(["Model", "Method", *(_latex_escape(c) for c in table.columns)])
    lines = [f"% {note}" for note in _notes(table, with_paper)]
    lines += [r"\begin{tabular}{ll" + "r" * len(table.columns) + "}", r"\toprule", header + r" \\", r"\midrule"]
    for index, row in enumerate(table.rows):
        if index and row.is_base:
            lines.append(r"\midrule")
        cells = []
        for column in table.columns:
            value = row.values.get(column)
            text = _number(value).replace("–", "--")
            if (index, column) in best:
                text = rf"\textbf{{{text}}}"
            note = _paper_note(table, row, column, value) if with_paper else None
            if note:
                text += r"\,{\scriptsize(" + note.replace("†", r"$^\dagger$") + ")}"
            cells.append(text)
        lines.append(" & ".join([_latex_escape(row.model), _latex_escape(row.label), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Machine-readable: ours, paper and difference as separate columns; flagged paper OP marked."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    paper_columns = [f"{c}_{kind}" for c in table.columns for kind in ("paper", "diff")]
    writer.writerow(["model", "method", "run", "complete", *table.columns, *paper_columns,
                     "paper_op_inconsistent", "bwt_convention"])
    for row in table.rows:
        ours = [row.values.get(c) for c in table.columns]
        extra = []
        for column, value in zip(table.columns, ours):
            paper = row.paper.get(column) if row.paper else None
            diff = value - paper if value is not None and paper is not None else None
            extra += [paper, diff]
        cells = [("" if v is None else round(v, 4)) for v in ours + extra]
        writer.writerow([row.model, row.label, row.run, row.complete, *cells, table.flagged(row),
                         table.bwt_convention])
    return buffer.getvalue()
