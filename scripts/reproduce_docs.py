"""Regenerate every miniature run number that README.md and docs/ show, from runs made here and now.

    python scripts/reproduce_docs.py                       # both parts: train, report, write the docs
    python scripts/reproduce_docs.py --part table1         # only the 12-method Table 1 (the k sweep kept)
    python scripts/reproduce_docs.py --part ksweep         # only the Figure 7 k sweep
    python scripts/reproduce_docs.py --render-only         # no training: re-report the last runs, rewrite the docs
    python scripts/reproduce_docs.py --out-root DIR        # where the runs go (default $PIECE_OUTPUT_ROOT/reproduce_docs)

Two parts, each one `piece-run -m` multirun of the embedded default followed by `piece-report` on its folder:

- table1: the twelve methods of configs/method/ with their defaults;
- ksweep: PIECE-F and PIECE-S at `method.ratio` 0.001 ... 0.05 (Figure 7).

The tables come from piece-report's own Markdown (`tables/table1_tiny.md`), the SeqFT R matrix from the
run's own report.md, the figures from piece-report's PNGs; this script renders nothing itself. It writes
them into ONE file, docs/generated/miniature_tables.md, between marker comments

    <!-- reproduce_docs:NAME -->  ...  <!-- /reproduce_docs:NAME -->

with a header naming the commands, the commit each part ran at, the machine (threads, CPU vector unit) and
the wall time; then it copies each block into README.md and docs/*.md wherever that marker pair stands.
tests/test_reproduce_docs.py checks, without rerunning anything, that the docs' blocks equal this file's.

Each part's run folder is remembered in `<out-root>/last_<part>.json` (written before training starts, so a
part killed midway can still be rendered from what finished: incomplete runs are marked by piece-report).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "docs" / "generated" / "miniature_tables.md"
IMG = ROOT / "docs" / "img"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

METHODS = sorted(p.stem for p in (ROOT / "configs" / "method").glob("*.yaml"))  # the twelve
RATIOS = ("0.001", "0.005", "0.01", "0.02", "0.05")
PARTS = {
    "table1": ["-m", "method=" + ",".join(METHODS)],
    "ksweep": ["-m", "method=piece_f,piece_s", "method.ratio=" + ",".join(RATIOS)],
}
# figure files piece-report writes (figures/<stem>.png) -> where the docs show them
FIGURES = {"table1": ("fig1_Tiny-Llama_tiny", "miniature_fig1.png"), "ksweep": ("fig7_tiny", "miniature_fig7.png")}
BEGIN = "<!-- reproduce_docs:{} -->"
END = "<!-- /reproduce_docs:{} -->"
BLOCK = re.compile(r"<!-- reproduce_docs:([a-z0-9_]+) -->\n(.*?)<!-- /reproduce_docs:\1 -->", re.S)


def blocks(text: str) -> dict[str, str]:
    """Marker name -> the text between its markers (tests/test_reproduce_docs.py uses this too)."""
    found: dict[str, str] = {}
    for name, body in BLOCK.findall(text):
        if name in found and found[name] != body:
            raise ValueError(f"block {name!r} appears twice with different text")
        found[name] = body
    return found


def _tool(name: str) -> list[str]:
    """The console script beside this interpreter, else the module (a checkout without an install)."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"piece-run": "piece_cl.cli", "piece-report": "piece_cl.report.cli"}[name]]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def commit() -> str:
    head = _git("rev-parse", "--short=12", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "piece_cl", "configs")
    return head + (" + uncommitted changes in piece_cl/ or configs/" if dirty and dirty != "unknown" else "")


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "unset"),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return ""


def _shell(argv: list[str]) -> str:
    return " ".join(argv)


def run_part(part: str, out_root: Path) -> dict:
    """Train one part (a piece-run multirun) into a fresh folder, then piece-report it."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    sweep = out_root / f"{part}_{stamp}"
    overrides = PARTS[part]
    state = {
        "part": part, "sweep_dir": str(sweep), "commit": commit(), "machine": machine(),
        "command": _shell(["piece-run", *overrides]), "started": dt.datetime.now().isoformat(timespec="seconds"),
        "seconds": None, "returncode": None,
    }
    _save_state(out_root, part, state)
    print(f"[reproduce_docs] {part}: {state['command']} -> {sweep}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([*_tool("piece-run"), *overrides, f"hydra.sweep.dir={sweep}"], cwd=ROOT)
    state.update(seconds=round(time.perf_counter() - started, 1), returncode=proc.returncode)
    _save_state(out_root, part, state)
    if proc.returncode:
        print(f"[reproduce_docs] {part}: piece-run exited {proc.returncode}; rendering what finished", flush=True)
    return state


def _state_path(out_root: Path, part: str) -> Path:
    return out_root / f"last_{part}.json"


def _save_state(out_root: Path, part: str, state: dict) -> None:
    out_root.mkdir(parents=True, exist_ok=True)
    _state_path(out_root, part).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def load_state(out_root: Path, part: str) -> dict | None:
    path = _state_path(out_root, part)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def report_part(state: dict) -> Path:
    """piece-report on the part's folder (into <sweep>/report); returns the report folder."""
    sweep = Path(state["sweep_dir"])
    out = sweep / "report"
    if out.exists():
        shutil.rmtree(out)
    proc = subprocess.run([*_tool("piece-report"), str(sweep), "--out", str(out)], cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"piece-report failed on {sweep} (exit {proc.returncode})")
    return out


def _finished_runs(sweep: Path) -> tuple[list[str], list[str]]:
    done, partial = [], []
    for path in sorted(sweep.rglob("results.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        (done if data.get("stages_done") == len(data.get("tasks", [])) else partial).append(path.parent.name)
    return done, partial


def _job_number(run_dir: Path) -> int:
    """Hydra's job number, the folder's `<num>_` prefix (job order, not the folders' lexical order)."""
    head = run_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def _run_minutes(sweep: Path) -> dict[str, float]:
    """Job folder -> minutes from its config.yaml (written at the start) to its results.json's last commit."""
    minutes = {}
    for results in sorted(sweep.glob("*/results.json"), key=lambda p: (_job_number(p.parent), p.parent.name)):
        config = results.parent / "config.yaml"
        if config.is_file():
            minutes[results.parent.name] = (results.stat().st_mtime - config.stat().st_mtime) / 60
    return minutes


def _job_label(run_dir: Path, part: str) -> str:
    """`seqft` for a job of table1, `piece_f k=0.005` for one of the k sweep (from its config.yaml)."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    method = config.get("method") or {}
    name = str(method.get("name", run_dir.name))
    return f"{name} k={method.get('ratio')}" if part == "ksweep" else name


def _weights(sweep: Path) -> str:
    """Which pretrained miniature the runs loaded: its cache key and a digest of the weights."""
    try:
        from omegaconf import OmegaConf

        from piece_cl.models.pretrain import cache_entry

        config = OmegaConf.load(next(sweep.glob("*/config.yaml")))
        entry = cache_entry(config.model, str(config.paths.cache_dir))
        key, weights = entry.name, entry / "model.safetensors"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        made = dt.datetime.fromtimestamp(weights.stat().st_mtime).isoformat(timespec="minutes")
        return f"miniature cache key `{key}`, weights sha256 `{digest}…` (pretrained {made})"
    except (StopIteration, OSError, KeyError, ImportError) as exc:
        return f"pretrained weights not identified ({type(exc).__name__})"


def _times(states: dict[str, dict]) -> str:
    """One line per part: its wall time, each job's minutes, and whether the parts overlapped."""
    lines = []
    spans = {}
    for part, state in states.items():
        sweep = Path(state["sweep_dir"])
        jobs = _run_minutes(sweep)
        per = ", ".join(f"{_job_label(sweep / name, part)} {m:.1f}" for name, m in jobs.items())
        took = "unfinished" if state["seconds"] is None else f"{state['seconds'] / 60:.1f} min"
        lines.append(f"- `{state['command']}`: {took} for {len(jobs)} runs (minutes per run, job order: {per}); "
                     f"load average {state['machine']['load_average']} at the start on {state['machine']['cores']} cores.")
        start = dt.datetime.fromisoformat(state["started"]).timestamp()
        spans[part] = (start, start + (state["seconds"] or 0))
    if len(spans) == 2:
        (a0, a1), (b0, b1) = spans.values()
        if a0 < b1 and b0 < a1:
            lines.append("- The two multiruns ran at the same time, sharing the cores.")
    return "\n".join(lines) + "\n"


def _r_matrix(run_dir: Path) -> str:
    """The R matrix table of the run's own report.md (results.py renders it)."""
    text = (run_dir / "report.md").read_text(encoding="utf-8")
    lines = text.split("## R matrix", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"  # the first table only (the OP/BWT/AP summary follows it)


def _figure(report: Path, part: str) -> tuple[str, str] | None:
    stem, target = FIGURES[part]
    png = report / "figures" / f"{stem}.png"
    if not png.is_file():
        return None
    IMG.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, IMG / target)
    return target, hashlib.sha256(png.read_bytes()).hexdigest()


def _header_lines(part: str, state: dict, report: Path) -> list[str]:
    sweep = Path(state["sweep_dir"])
    done, partial = _finished_runs(sweep)
    m = state["machine"]
    seconds = state["seconds"]
    took = "not finished (killed or still running)" if seconds is None else f"{seconds / 60:.1f} min"
    lines = [
        f"- **{part}**: `{state['command']}`, then `piece-report <folder>`; commit {state['commit']}, "
        f"started {state['started']}, wall time {took}, piece-run exit {state['returncode']}.",
        f"  Machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average']} at the start; torch "
        f"{m['torch']}, {m['torch_threads']} thread(s) (`OMP_NUM_THREADS={m['OMP_NUM_THREADS']}`), CPU capability "
        f"`{m['cpu_capability']}` (`ATEN_CPU_CAPABILITY={m['ATEN_CPU_CAPABILITY']}`).",
        f"  Pretrained model: {_weights(sweep)}.",
        f"  Runs finished: {len(done)}" + (f"; incomplete: {', '.join(partial)}" if partial else "") + ".",
    ]
    expected = len(METHODS) if part == "table1" else 2 * len(RATIOS)
    if len(done) < expected:
        lines.append(f"  **Missing**: {expected - len(done)} of the {expected} runs did not finish.")
    return lines


def render(out_root: Path) -> None:
    """Re-report the last runs of each part and write the generated file and the docs' blocks."""
    header = ["# The miniature's measured tables (generated)", "",
              "Written by `python scripts/reproduce_docs.py`; do not edit by hand: README.md and docs/*.md copy",
              "the blocks below between their `reproduce_docs` markers, and tests/test_reproduce_docs.py checks",
              "that they are equal. Numbers are as measured on the machine named; the miniature's reading depends",
              "on the CPU (docs/miniature.md, \"How much the reading depends on the CPU\").", ""]
    body: list[str] = []
    states = {}
    for part in PARTS:
        state = load_state(out_root, part)
        if state is None or not Path(state["sweep_dir"]).is_dir():
            header.append(f"- **{part}**: not run yet (`python scripts/reproduce_docs.py --part {part}`).")
            continue
        states[part] = state
        report = report_part(state)
        header += _header_lines(part, state, report)
        table = (report / "tables" / "table1_tiny.md").read_text(encoding="utf-8")
        body += ["", f"## {part}", "", BEGIN.format(part), table.rstrip("\n"), END.format(part)]
        figure = _figure(report, part)
        if figure:
            name, digest = figure
            header.append(f"  Figure: `docs/img/{name}` (piece-report's `figures/{FIGURES[part][0]}.png`), "
                          f"sha256 `{digest}`.")
        if part == "table1":
            seqft = sorted(Path(state["sweep_dir"]).glob("*_seqft_*/results.json"))
            if seqft:
                body += ["", "SeqFT's R matrix (the default run, `piece-run`), from its report.md:", "",
                         BEGIN.format("seqft_r"), _r_matrix(seqft[0].parent).rstrip("\n"), END.format("seqft_r")]
    if states:
        body += ["", "## times", "", BEGIN.format("times"), _times(states).rstrip("\n"), END.format("times")]
    GENERATED.parent.mkdir(parents=True, exist_ok=True)
    GENERATED.write_text("\n".join(header + body) + "\n", encoding="utf-8")
    print(f"[reproduce_docs] wrote {GENERATED.relative_to(ROOT)}")
    sync_docs()


def sync_docs() -> None:
    """Copy each block of the generated file into every doc that carries its markers."""
    generated = blocks(GENERATED.read_text(encoding="utf-8"))
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")

        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in generated:
                return match.group(0)  # not generated this time: left as it was (the test reports it)
            return f"{BEGIN.format(name)}\n{generated[name]}{END.format(name)}"

        new = BLOCK.sub(replace, text)
        if new != text:
            doc.write_text(new, encoding="utf-8")
            print(f"[reproduce_docs] updated {doc.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all", help="what to train (default: all)")
    parser.add_argument("--render-only", action="store_true",
                        help="train nothing: piece-report the last runs of each part and rewrite the docs")
    parser.add_argument("--no-render", action="store_true", help="train only (e.g. the two parts side by side, each with OMP_NUM_THREADS=1), render later")
    parser.add_argument("--out-root", type=Path,
                        default=Path(os.environ.get("PIECE_OUTPUT_ROOT", ROOT / "outputs")) / "reproduce_docs")
    args = parser.parse_args(argv)
    out_root = args.out_root.resolve()
    if not args.render_only:
        for part in PARTS if args.part == "all" else [args.part]:
            run_part(part, out_root)
    if not args.no_render:
        render(out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
