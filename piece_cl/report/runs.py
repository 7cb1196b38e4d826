"""Find and load finished (or partial) runs: results.json, config.yaml and the stage folders."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from piece_cl.errors import PieceError
from piece_cl.report.paper import method_name, model_name

STAGE_DIR = re.compile(r"^stage_(\d+)_(.+)$")


@dataclass
class Stage:
    index: int
    task: str
    path: Path


@dataclass
class Run:
    """One run folder as piece-run writes it (docs/design.md "Run outputs")."""

    path: Path
    results: dict
    config: dict = field(default_factory=dict)

    def _paper_name(self, group: str, fallback) -> str:
        """The run's own config `<group>.paper_name` (what it ran as), else the shipped configs' name."""
        node = self.config.get(group)
        named = node.get("paper_name") if isinstance(node, dict) else None
        return str(named) if named else fallback(str(self.results.get(group, "?")))

    @property
    def model(self) -> str:
        return self._paper_name("model", model_name)

    @property
    def method(self) -> str:
        return self._paper_name("method", method_name)

    @property
    def benchmark(self) -> str:
        return str(self.results.get("benchmark", "?"))

    @property
    def tasks(self) -> list[str]:
        return list(self.results.get("tasks", []))

    @property
    def R(self) -> list[list[float]]:
        return [list(row) for row in self.results.get("R", [])]

    @property
    def complete(self) -> bool:
        return len(self.R) == len(self.tasks)

    @property
    def probe(self) -> dict:
        return self.results.get("probe") or {}

    @property
    def ratio(self) -> float | None:
        """The sparsity ratio k of mask-based methods, from the run's resolved config."""
        value = (self.config.get("method") or {}).get("ratio")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        return f"{self.model} {self.method}"

    def stages(self) -> list[Stage]:
        """Stage folders in stage order (stage_<t>_<task>)."""
        found = []
        for child in self.path.iterdir():
            match = STAGE_DIR.match(child.name)
            if child.is_dir() and match:
                found.append(Stage(int(match.group(1)), match.group(2), child))
        return sorted(found, key=lambda stage: stage.index)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PieceError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or "R" not in data or "tasks" not in data:
        raise PieceError(f"{path} is not a piece-run results.json (needs 'tasks' and 'R')")
    return data


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PieceError(f"cannot parse {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def load_run(path: Path) -> Run:
    return Run(path=path, results=_read_json(path / "results.json"), config=_read_config(path / "config.yaml"))


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run under the given folders: a run folder itself, or a sweep folder walked for results.json."""
    run_dirs: list[Path] = []
    for path in paths:
        if not path.exists():
            raise PieceError(f"no such folder: {path}")
        found = [path] if (path / "results.json").is_file() else sorted(p.parent for p in path.rglob("results.json"))
        if not found:
            raise PieceError(f"no results.json under {path}")
        run_dirs.extend(found)
    unique = list(dict.fromkeys(p.resolve() for p in run_dirs))
    return [load_run(p) for p in unique]


def method_labels(runs: list[Run]) -> dict[Path, str]:
    """Run folder -> method label; several runs of one (model, method), e.g. a k sweep, get k or the run name."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.model, run.method)].append(run)
    labels = {}
    for group in groups.values():
        ratios = [run.ratio for run in group]
        by_ratio = None not in ratios and len(set(ratios)) == len(ratios)
        for run in group:
            suffix = "" if len(group) == 1 else f" (k={run.ratio:g})" if by_ratio else f" ({run.name})"
            labels[run.path] = run.method + suffix
    return labels
