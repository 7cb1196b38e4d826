"""Assemble the report folder: tables (md, tex, csv), figures (png, pdf) and report.md embedding them.

Anything a run lacks (masks for a method without them, loss curves, a sweep with one ratio) is skipped
and said so in report.md; it never stops the report.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from piece_cl.evaluation.metrics import ap, op
from piece_cl.report import figures, masks
from piece_cl.report.paper import probe_name, sort_key
from piece_cl.report.runs import Run, find_runs, method_labels
from piece_cl.report.tables import (
    BWT_CONVENTIONS,
    build_tables,
    final_bwt,
    to_csv,
    to_latex,
    to_markdown,
)

LOSS_COLUMNS = ("global_step", "stage", "task", "loss")


@dataclass
class Section:
    title: str
    body: list[str] = field(default_factory=list)

    def figure(self, png: Path, out: Path, caption: str) -> None:
        self.body += [f"![{caption}]({png.relative_to(out).as_posix()})", "", f"*{caption}*", ""]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _run_masks(run: Run) -> list[masks.Mask | None]:
    by_stage: dict[int, Path] = {s.index: s.path / "mask.safetensors" for s in run.stages()}
    return [masks.load_mask(by_stage[t]) if t in by_stage and by_stage[t].is_file() else None
            for t in range(len(run.R))]


def read_loss_curves(run: Run) -> list[figures.LossPoint]:
    """Held-out loss rows of every stage; steps restarting at a stage are shifted to follow the last."""
    points: list[figures.LossPoint] = []
    for stage in run.stages():
        path = stage.path / "loss_curves.csv"
        if not path.is_file():
            continue
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
        if not rows or not set(LOSS_COLUMNS) <= set(rows[0]):
            continue
        steps = [float(r["global_step"]) for r in rows]
        last = max((p.step for p in points), default=None)
        shift = last if last is not None and min(steps) <= last else 0.0
        points += [figures.LossPoint(step + shift, int(r["stage"]), r["task"], float(r["loss"]))
                   for step, r in zip(steps, rows)]
    return points


def _tables_section(runs: list[Run], out: Path, convention: str, with_paper: bool) -> Section:
    section = Section("Tables")
    for table in build_tables(runs, convention):
        base = out / "tables" / table.stem
        base.parent.mkdir(parents=True, exist_ok=True)
        markdown = to_markdown(table, with_paper)
        base.with_suffix(".md").write_text(markdown, encoding="utf-8")
        base.with_suffix(".tex").write_text(to_latex(table, with_paper), encoding="utf-8")
        base.with_suffix(".csv").write_text(to_csv(table), encoding="utf-8")
        section.body += [markdown, f"LaTeX: [`tables/{table.stem}.tex`](tables/{table.stem}.tex) · "
                         f"CSV: [`tables/{table.stem}.csv`](tables/{table.stem}.csv)", ""]
    return section


def _curves_section(runs: list[Run], labels: dict[Path, str], out: Path) -> Section:
    section = Section("Figure 1: OP and probe vs tasks learned; R matrices")
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.model, run.benchmark)].append(run)
    for (model, benchmark), group in sorted(groups.items()):
        group.sort(key=lambda r: (sort_key(r.model, r.method), r.ratio or 0.0))
        op_curves = [figures.Curve(labels[r.path], list(range(1, len(r.R) + 1)), op(r.R)) for r in group if r.R]
        probe_curves = []
        for r in group:
            scores = [r.probe.get("base"), *(r.probe.get("after_task") or [])]
            points = [(x, y) for x, y in enumerate(scores) if y is not None]
            probe_curves.append(figures.Curve(labels[r.path], [x for x, _ in points], [y for _, y in points]))
        probe = probe_name(group[0].probe.get("name") or "probe")
        png = figures.op_and_probe(op_curves, probe_curves, probe, f"{model} on {benchmark}",
                                   out / "figures", _slug(f"fig1_{model}_{benchmark}"))
        section.figure(png, out, f"Figure 1 — {model}, {benchmark}: (a) OP and (b) {probe} vs tasks learned")
    for run in runs:
        if run.R:
            png = figures.r_matrix(run.R, run.tasks, f"R: {run.model} {labels[run.path]}", out / "figures",
                                   _slug(f"R_{run.name}"))
            section.figure(png, out, f"R matrix — {run.model} {labels[run.path]} ({run.name})")
    return section


def _mask_sections(runs: list[Run], labels: dict[Path, str], out: Path) -> list[Section]:
    where = Section("Figure 3: where the selected parameters sit")
    shared = Section("Figure 5: overlap of the tasks' masks")
    table4 = Section("Figure 6 / Table 4: overlap vs forgetting")
    without = []
    correlations: dict[tuple[str, str], dict[str, masks.Correlation]] = defaultdict(dict)
    rows = []
    for run in runs:
        run_masks = _run_masks(run)
        present = [m for m in run_masks if m is not None]
        if not present:
            without.append(run.name)
            continue
        title = f"{run.model} {labels[run.path]}"
        png = figures.module_layers(masks.module_counts(present), title, out / "figures", _slug(f"fig3_{run.name}"))
        where.figure(png, out, f"Figure 3 — {title}: selected entries by module × layer, all tasks")
        if len(present) >= 2:
            index = [t for t, m in enumerate(run_masks) if m is not None]
            matrix = masks.overlap_matrix(present)
            png = figures.overlap(matrix, [run.tasks[t] for t in index], title, out / "figures",
                                  _slug(f"fig5_{run.name}"))
            shared.figure(png, out, f"Figure 5 — {title}: |M_i ∩ M_j| / k")
        corr = masks.overlap_forgetting(run_masks, run.R)
        correlations[(run.model, run.benchmark)][labels[run.path]] = corr
        rows.append([run.model, labels[run.path], corr.n, corr.pearson_r, corr.pearson_p,
                     corr.spearman_rho, corr.spearman_p])
    for (model, benchmark), by_label in sorted(correlations.items()):
        if any(c.n for c in by_label.values()):
            png = figures.overlap_vs_forgetting(by_label, f"{model} on {benchmark}", out / "figures",
                                                _slug(f"fig6_{model}_{benchmark}"))
            table4.figure(png, out, f"Figure 6 — {model}, {benchmark}: pair forgetting vs mask overlap")
    if rows:
        _write_table4(rows, out)
        table4.body = ["| Model | Method | pairs | Pearson r | Pearson p | Spearman ρ | Spearman p |",
                       "|---|---|---:|---:|---:|---:|---:|",
                       *(f"| {m} | {l} | {n} | " + " | ".join(_fmt(v) for v in vals) + " |"
                         for m, l, n, *vals in rows),
                       "", "Forgetting of pair (i, j), i < j: R_{j−1,i} − R_{j,i} (the drop of task i's score "
                       "while learning task j); the paper does not define it. n/a: fewer than 3 pairs or a "
                       "constant series. CSV: [`tables/table4.csv`](tables/table4.csv)", ""] + table4.body
    if without:
        note = "No masks (method saves none, or not yet run) for: " + ", ".join(without) + "."
        for section in (where, shared, table4):
            section.body.append(note)
    return [where, shared, table4]


def _write_table4(rows: list[list], out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "method", "pairs", "pearson_r", "pearson_p", "spearman_rho", "spearman_p"])
    writer.writerows(rows)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "tables" / "table4.csv").write_text(buffer.getvalue(), encoding="utf-8")


def _sweep_section(runs: list[Run], out: Path, convention: str) -> Section:
    section = Section("Figure 7: effect of the ratio k")
    by_benchmark: dict[str, dict[str, list[figures.SweepPoint]]] = defaultdict(lambda: defaultdict(list))
    probes: dict[str, str] = {}
    for run in runs:
        if run.ratio is None or not run.R:
            continue
        after = run.probe.get("after_task") or []
        point = figures.SweepPoint(run.ratio, ap(run.R)[-1], sum(run.R[-1]) / len(run.R[-1]),
                                   final_bwt(run.R, len(run.tasks), convention), after[-1] if after else None)
        by_benchmark[run.benchmark][run.label].append(point)
        probes[run.benchmark] = probe_name(run.probe.get("name") or "probe")
    for benchmark, groups in sorted(by_benchmark.items()):
        sweeps = {label: pts for label, pts in groups.items() if len({p.ratio for p in pts}) >= 2}
        if not sweeps:
            continue
        png = figures.ratio_sweep(sweeps, probes[benchmark], f"BWT ({convention})", f"ratio sweep on {benchmark}",
                                  out / "figures", _slug(f"fig7_{benchmark}"))
        section.figure(png, out, f"Figure 7 — {benchmark}: AP, OP, BWT and probe vs k")
    if not section.body:
        section.body.append("No sweep: needs runs of one model and method at two or more ratios k "
                            "(`piece-run -m experiment=fig7_k_sweep`).")
    return section


def _loss_section(runs: list[Run], labels: dict[Path, str], out: Path) -> Section:
    section = Section("Figures 17–19: held-out loss across the sequence")
    without = []
    for run in runs:
        points = read_loss_curves(run)
        if not points:
            without.append(run.name)
            continue
        title = f"{run.model} {labels[run.path]}"
        png = figures.loss_curves(points, run.tasks, title, out / "figures", _slug(f"loss_{run.name}"))
        section.figure(png, out, f"Held-out loss — {title}")
    if without:
        section.body.append("No loss_curves.csv for: " + ", ".join(without) + ".")
    return section


def generate_report(paths: list[Path], out: Path, convention: str = "all", with_paper: bool = True) -> Path:
    """Write the whole report folder for the runs under `paths`; returns the path of report.md."""
    runs = find_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    labels = method_labels(runs)
    sections = [
        _tables_section(runs, out, convention, with_paper),
        _curves_section(runs, labels, out),
        *_mask_sections(runs, labels, out),
        _sweep_section(runs, out, convention),
        _loss_section(runs, labels, out),
    ]
    lines = ["# piece-report", "", f"{len(runs)} run(s): " + ", ".join(f"`{r.name}`" for r in runs), "",
             f"BWT convention: {BWT_CONVENTIONS[convention]}.", ""]
    for section in sections:
        lines += [f"## {section.title}", "", *section.body, ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
