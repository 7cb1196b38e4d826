"""The paper's figures from runs, as PNG and PDF, readable in greyscale.

Lines differ by marker and line style as well as colour, each method in one fixed style; heatmaps use a grey scale with the values
written in the cells. Figure sizes are fixed (inches × DPI) so outputs are predictable.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from piece_cl.report.masks import EXTRA_MODULES, PAPER_MODULES, Correlation  # noqa: E402
from piece_cl.report.paper import method_name  # noqa: E402

DPI = 100
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
LINESTYLES = ["-", "--", ":", "-."]
HATCHES = ["", "//"]


def _styles():
    """Endless (colour, marker, linestyle) triples that stay distinct without colour."""
    colours = plt.get_cmap("tab10").colors
    for index in itertools.count():
        yield {"color": colours[index % 10], "marker": MARKERS[index % len(MARKERS)],
               "linestyle": LINESTYLES[index % len(LINESTYLES)]}


# One fixed style per method (by config name; keyed by its paper name, the label figures print), so a
# method looks the same in every figure and all twelve differ by colour AND by marker: ten tab10
# colours, then black and gold for PIECE.
METHOD_STYLES = {
    method_name(key): {"color": colour, "marker": marker, "linestyle": LINESTYLES[index % len(LINESTYLES)]}
    for index, (key, colour, marker) in enumerate([
        ("seqft", "tab:blue", "o"), ("ewc", "tab:orange", "s"), ("gem", "tab:green", "^"),
        ("lwf", "tab:red", "D"), ("replay", "tab:purple", "v"), ("replay_online", "tab:brown", "P"),
        ("seqlora", "tab:pink", "X"), ("olora", "tab:gray", "<"), ("layernorm", "tab:olive", ">"),
        ("migu", "tab:cyan", "h"), ("piece_f", "black", "*"), ("piece_s", "#d4a000", "p"),
    ])
}


def _method_of(label: str) -> str | None:
    """The method a series label names ("PIECE-F (k=0.01)" -> "PIECE-F"); longest name wins."""
    names = [n for n in METHOD_STYLES if label == n or label.startswith(n + " ")]
    return max(names, key=len) if names else None


def series_styles(labels: list[str]) -> list[dict]:
    """Styles for the series of one figure: each method its fixed style; a method's second and later
    series (other ratios, other runs) keep its colour and marker with the next line style (then hollow
    markers); labels that
    name no method take the free tab10 cycle."""
    seen: Counter = Counter()
    free = _styles()
    styles = []
    for label in labels:
        method = _method_of(label)
        if method is None:
            styles.append(next(free))
            continue
        base = METHOD_STYLES[method]
        shift = LINESTYLES.index(base["linestyle"]) + seen[method]
        style = {**base, "linestyle": LINESTYLES[shift % len(LINESTYLES)]}
        if seen[method] >= len(LINESTYLES):  # past every line style: hollow markers
            style["fillstyle"] = "none"
        styles.append(style)
        seen[method] += 1
    return styles


def save(fig, out_dir: Path, stem: str) -> Path:
    """Write <stem>.png and <stem>.pdf, close the figure, return the PNG path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    fig.savefig(png, dpi=DPI)
    fig.savefig(out_dir / f"{stem}.pdf")
    plt.close(fig)
    return png


def _annotated_heatmap(ax, matrix: np.ndarray, fmt: str, vmax: float | None = None, skip_zero: bool = False):
    """Grey heatmap with each finite value written in its cell (white on dark cells)."""
    finite = matrix[np.isfinite(matrix)]
    top = vmax if vmax is not None else (finite.max() if finite.size else 1.0) or 1.0
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="Greys", vmin=0, vmax=top, aspect="auto")
    if matrix.size <= 400:
        for (row, col), value in np.ndenumerate(matrix):
            if np.isfinite(value) and not (skip_zero and value == 0):
                ax.text(col, row, format(value, fmt), ha="center", va="center", fontsize=8,
                        color="white" if value > 0.6 * top else "black")
    return image


def r_matrix(R: list[list[float]], tasks: list[str], title: str, out_dir: Path, stem: str) -> Path:
    """R_{t,i}: score on task i (columns) after learning task t (rows)."""
    n = len(tasks)
    matrix = np.full((len(R), n), np.nan)
    for t, row in enumerate(R):
        matrix[t, : len(row)] = row
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    image = _annotated_heatmap(ax, matrix, ".1f", vmax=100.0)
    ax.set_xticks(range(n), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(R)), [f"after {tasks[t]}" for t in range(len(R))])
    ax.set_xlabel("evaluated task i")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score")
    return save(fig, out_dir, stem)


@dataclass
class Curve:
    label: str
    x: list[float]
    y: list[float]


def op_and_probe(op_curves: list[Curve], probe_curves: list[Curve], probe: str, title: str,
                 out_dir: Path, stem: str) -> Path:
    """Figure 1: (a) OP and (b) probe score vs number of tasks learned, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for ax, curves, ylabel, panel in ((axes[0], op_curves, "OP", "(a)"), (axes[1], probe_curves, probe, "(b)")):
        for curve, style in zip(curves, series_styles([c.label for c in curves])):
            ax.plot(curve.x, curve.y, label=curve.label, **style)
        ax.set_xlabel("number of tasks learned")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{panel} {ylabel}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    return save(fig, out_dir, stem)


def module_layers(counts: Counter, title: str, out_dir: Path, stem: str) -> Path:
    """Figure 3: selected entries per module type (rows) × layer (columns); N, lm, E in the last column."""
    present = {module for module, _ in counts}
    modules = PAPER_MODULES + [m for m in EXTRA_MODULES if m in present]
    layers = [layer for _, layer in counts if layer is not None]
    n_layers = max(layers) + 1 if layers else 0
    matrix = np.zeros((len(modules), n_layers + 1))
    for (module, layer), count in counts.items():
        matrix[modules.index(module), n_layers if layer is None else layer] += count
    fig, ax = plt.subplots(figsize=(10, 4.5), layout="constrained")
    image = _annotated_heatmap(ax, matrix, ".0f", skip_zero=True)
    ax.set_yticks(range(len(modules)), modules)
    step = max(1, n_layers // 16)
    ticks = list(range(0, n_layers, step)) + [n_layers]
    ax.set_xticks(ticks, [str(t) for t in ticks[:-1]] + ["out"])
    ax.set_xlabel("layer ('out': final norm N, lm head, embeddings)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="selected entries (all tasks)")
    return save(fig, out_dir, stem)


def overlap(matrix: np.ndarray, tasks: list[str], title: str, out_dir: Path, stem: str) -> Path:
    """Figure 5: |M_i ∩ M_j| / k between tasks' masks."""
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    image = _annotated_heatmap(ax, matrix, ".2f", vmax=1.0)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="|M_i ∩ M_j| / k")
    return save(fig, out_dir, stem)


def overlap_vs_forgetting(correlations: dict[str, Correlation], title: str, out_dir: Path, stem: str) -> Path:
    """Figure 6: pair forgetting against pair overlap, one marker per method, r and ρ in the legend."""
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for (label, corr), style in zip(correlations.items(), series_styles(list(correlations))):
        ax.scatter(corr.overlaps, corr.forgetting, color=style["color"], marker=style["marker"],
                   facecolors="none" if style["linestyle"] != "-" else style["color"],
                   label=f"{label}: r={_stat(corr.pearson_r)}, ρ={_stat(corr.spearman_rho)} (n={corr.n})")
    ax.axhline(0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("overlap |M_i ∩ M_j| / k")
    ax.set_ylabel("forgetting R_{j-1,i} − R_{j,i}")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save(fig, out_dir, stem)


def _stat(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.2f}"


@dataclass
class SweepPoint:
    ratio: float
    ap: float | None
    op: float | None
    bwt: float | None
    probe: float | None


def ratio_sweep(groups: dict[str, list[SweepPoint]], probe: str, bwt_label: str, title: str,
                out_dir: Path, stem: str) -> Path:
    """Figure 7: AP, OP, BWT and probe vs the ratio k (log scale), one line per (model, method)."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 7), layout="constrained")
    panels = [("ap", "AP"), ("op", "OP"), ("bwt", bwt_label), ("probe", probe)]
    percents = sorted({p.ratio * 100 for points in groups.values() for p in points})
    for ax, (field, ylabel) in zip(axes.flat, panels):
        for (label, points), style in zip(groups.items(), series_styles(list(groups))):
            pts = sorted((p.ratio, getattr(p, field)) for p in points if getattr(p, field) is not None)
            ax.plot([r * 100 for r, _ in pts], [v for _, v in pts], label=label, **style)
        ax.set_xscale("log")
        ax.set_xticks(percents, [f"{x:g}" for x in percents])
        ax.minorticks_off()
        ax.set_xlabel("ratio k (% of parameters)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    return save(fig, out_dir, stem)


@dataclass
class LossPoint:
    step: float
    stage: int
    task: str
    loss: float


def loss_curves(points: list[LossPoint], stage_tasks: list[str], title: str, out_dir: Path, stem: str) -> Path:
    """Figures 17–19: held-out loss of every task across the sequence; bands mark the task being trained."""
    fig, ax = plt.subplots(figsize=(10, 4.5), layout="constrained")
    for stage, task in enumerate(stage_tasks):
        steps = [p.step for p in points if p.stage == stage]
        if not steps:
            continue
        ax.axvspan(min(steps), max(steps), facecolor="0.9" if stage % 2 == 0 else "white",
                   hatch=HATCHES[stage % 2], edgecolor="0.8", linewidth=0)
        ax.text((min(steps) + max(steps)) / 2, 1.01, task, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8)
    tasks = list(dict.fromkeys(p.task for p in points))
    for task, style in zip(tasks, _styles()):
        series = sorted((p.step, p.loss) for p in points if p.task == task)
        ax.plot([s for s, _ in series], [v for _, v in series], label=task,
                markevery=max(1, len(series) // 12), markersize=4, **style)
    ax.set_xlabel("training step (bands: task being trained)")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, pad=16)
    return save(fig, out_dir, stem)
