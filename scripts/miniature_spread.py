"""How much the miniature's reading depends on the CPU: pretrain and probe it under several float orders.

    .venv/bin/python scripts/miniature_spread.py [--settings 1t 2t avx2 scalar] [--run | --seeds 42 43 44]
                                                 [--out spread.json] [hydra overrides]

Each setting pretrains the miniature from scratch in a fresh process (its own cache directory, so
nothing is shared) with a different floating-point summation order — the AVX2 or scalar kernels
(`ATEN_CPU_CAPABILITY=avx2`, `=default`) instead of the CPU's best, or two threads instead of one (which
reach only the default run: pretraining always runs at one thread) — then scores the base model on the
mini-HumanEval probe. Prints one row per setting and the spread (max - min) of the probe; `--run` adds
the embedded default run (SeqFT) per setting and the spread of its final OP and probe; `--seeds` runs it
once per training seed (`seed=S`, same pretrained model) and adds each setting's mean and spread over the
seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "1t": {"OMP_NUM_THREADS": "1"},
    "2t": {"OMP_NUM_THREADS": "2"},
    # the vector unit varied alone: one thread, as in 1t
    "scalar": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"},
}

CHILD = r"""
import json, os, sys, torch
from hydra import compose, initialize_config_dir
from piece_cl.benchmarks.registry import build_benchmark
from piece_cl.models.pretrain import load_miniature
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
with initialize_config_dir(config_dir=sys.argv[1], version_base=None):
    cfg = compose("config", overrides=sys.argv[3:])
model, tokenizer = load_miniature(cfg.model, sys.argv[2])
probe = build_benchmark(cfg).probe
score, _ = probe.evaluate(model, tokenizer, cfg.eval)
print("RESULT " + json.dumps({"probe": score, "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def _child_env(setting: str, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return {**env, **SETTINGS[setting], "PIECE_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}


def measure(setting: str, cache: Path, overrides: list[str], seeds: list[int | None]) -> dict:
    env = _child_env(setting, cache)
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "configs"), str(cache), *overrides],
                         env=env, capture_output=True, text=True, check=True).stdout
    row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    row["final_loss"] = next((float(line.split("final loss ")[1].split(",")[0])
                              for line in out.splitlines() if "final loss" in line), None)
    runs = [_default_run(env, cache / f"run_{seed}", [*overrides, *([f"seed={seed}"] if seed is not None else [])])
            for seed in seeds]
    if runs:
        ops, probes = [r["OP"][-1] for r in runs], [r["probe"]["after_task"][-1] for r in runs]
        row.update(run_OP=sum(ops) / len(ops), run_probe=sum(probes) / len(probes))
    if len(runs) > 1:
        row.update(seeds=seeds, run_OP_by_seed=ops, run_probe_by_seed=probes,
                   run_OP_seed_spread=max(ops) - min(ops), run_probe_seed_spread=max(probes) - min(probes))
    return row


def _default_run(env: dict, run_dir: Path, overrides: list[str]) -> dict:
    """results.json of `piece-run OVERRIDES` (the embedded default: SeqFT) in a fresh process."""
    subprocess.run([sys.executable, "-m", "piece_cl.cli", *overrides, f"hydra.run.dir={run_dir}"],
                   env=env, capture_output=True, text=True, check=True)
    return json.loads((run_dir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--run", action="store_true", help="also the embedded default run per setting")
    parser.add_argument("--seeds", nargs="+", type=int, default=[],
                        help="the default run once per training seed (implies --run), e.g. --seeds 42 43 44")
    parser.add_argument("--out", type=Path, help="write the rows and spreads as JSON")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.pretrain.steps=1600")
    args = parser.parse_args()
    rows, seeds = {}, args.seeds or ([None] if args.run else [])
    with tempfile.TemporaryDirectory(prefix="miniature-spread-") as tmp:
        for setting in args.settings:
            rows[setting] = measure(setting, Path(tmp) / setting, args.overrides, seeds)
            print(f"{setting:>7}  {json.dumps(rows[setting])}", flush=True)
    spreads = {key: max(r[key] for r in rows.values()) - min(r[key] for r in rows.values())
               for key in ("probe", "run_OP", "run_probe") if all(key in r for r in rows.values())}
    print("spread (max - min): " + "  ".join(f"{k} {v:.2f}" for k, v in spreads.items()))
    if args.out:
        args.out.write_text(json.dumps({"overrides": args.overrides, "rows": rows, "spread": spreads}, indent=1))


if __name__ == "__main__":
    main()
