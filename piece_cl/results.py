"""The run's results: the R matrix, its summaries and the probe curve, as results.json and report.md."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from piece_cl.errors import PieceError
from piece_cl.evaluation.metrics import ap, bwt, op
from piece_cl.io import atomic_write_json, atomic_write_text


@dataclass
class RunResults:
    run: str
    model: str
    method: str
    benchmark: str
    tasks: list[str]
    probe_name: str | None
    R: list[list[float]] = field(default_factory=list)
    probe_base: float | None = None
    probe_after: list[float] = field(default_factory=list)

    def add_stage(self, row: list[float], probe: float | None) -> None:
        self.R.append([round(x, 4) for x in row])
        if probe is not None:
            self.probe_after.append(round(probe, 4))

    def to_dict(self) -> dict:
        """Deterministic content only (no timestamps or durations): reruns are byte-identical."""
        r4 = lambda xs: [round(x, 4) for x in xs]  # noqa: E731
        return {
            "run": self.run, "model": self.model, "method": self.method, "benchmark": self.benchmark,
            "tasks": self.tasks, "R": self.R,
            "OP": r4(op(self.R)), "BWT": r4(bwt(self.R)), "AP": r4(ap(self.R)),
            "probe": {"name": self.probe_name, "base": self.probe_base, "after_task": self.probe_after},
            "stages_done": len(self.R),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "RunResults":
        probe = data.get("probe") or {}
        return cls(run=data["run"], model=data["model"], method=data["method"], benchmark=data["benchmark"],
                   tasks=list(data["tasks"]), probe_name=probe.get("name"), R=[list(r) for r in data["R"]],
                   probe_base=probe.get("base"), probe_after=list(probe.get("after_task", [])))

    @property
    def stages_done(self) -> int:
        return len(self.R)

    @property
    def finished(self) -> bool:
        return len(self.R) == len(self.tasks)

    def save(self, run_dir: Path) -> None:
        atomic_write_json(run_dir / "results.json", self.to_dict())
        atomic_write_text(run_dir / "report.md", self.markdown())

    def matrix_text(self) -> str:
        """The R matrix as an aligned text table (console and report.md)."""
        names = [t[:12] for t in self.tasks]
        head = "after".ljust(14) + "".join(n.rjust(13) for n in names)
        if self.probe_name:
            head += "probe".rjust(10)
        lines = [head]
        if self.probe_base is not None:
            lines.append("base".ljust(14) + " " * 13 * len(names) + f"{self.probe_base:10.2f}")
        for t, row in enumerate(self.R):
            cells = "".join(f"{x:13.2f}" for x in row) + " " * 13 * (len(names) - len(row))
            probe = f"{self.probe_after[t]:10.2f}" if t < len(self.probe_after) else ""
            lines.append(names[t].ljust(14) + cells + probe)
        return "\n".join(lines)

    def markdown(self) -> str:
        d = self.to_dict()
        status = "finished" if self.finished else f"in progress ({len(self.R)}/{len(self.tasks)} stages)"
        rows = ["| after \\ on | " + " | ".join(self.tasks) + (" | probe |" if self.probe_name else " |"),
                "|---" * (len(self.tasks) + 1 + bool(self.probe_name)) + "|"]
        if self.probe_base is not None:
            rows.append("| base model | " + " | ".join("" for _ in self.tasks) + f" | {self.probe_base:.2f} |")
        for t, row in enumerate(self.R):
            cells = [f"{x:.2f}" for x in row] + [""] * (len(self.tasks) - len(row))
            probe = [f"{self.probe_after[t]:.2f}"] if self.probe_name and t < len(self.probe_after) else ([""] if self.probe_name else [])
            rows.append(f"| {self.tasks[t]} | " + " | ".join(cells + probe) + " |")
        summary = "| stage | OP | BWT | AP |\n|---|---|---|---|\n" + "\n".join(
            f"| {t + 1} | {d['OP'][t]:.2f} | {d['BWT'][t]:.2f} | {d['AP'][t]:.2f} |" for t in range(len(self.R)))
        return (f"# {self.run}\n\nmodel `{self.model}`, method `{self.method}`, benchmark `{self.benchmark}` — {status}\n\n"
                f"## R matrix (row: after learning the task; column: score on the task, 0–100)\n\n"
                + "\n".join(rows) + f"\n\nProbe: `{self.probe_name}`.\n\n## Summary (paper notes §2: BWT divides by t)\n\n"
                + summary + "\n")


def load_results(run_dir: Path) -> RunResults | None:
    """The committed results of a run directory, or None when no stage has been committed."""
    path = run_dir / "results.json"
    if not path.exists():
        return None
    try:
        return RunResults.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        raise PieceError(f"{path} is corrupted ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                         "restore it from a copy, or start again in a new hydra.run.dir") from None
