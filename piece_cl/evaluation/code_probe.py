"""Pass@1 of a model on HumanEval-format problems, by executing their unit tests in the sandbox.

Used for mini-HumanEval (the miniature's probe) and for the real HumanEval (164 problems).
"""
from __future__ import annotations

from dataclasses import dataclass

from piece_cl.evaluation.generation import generate_for_eval
from piece_cl.evaluation.sandbox import Candidate, check_candidates, sandbox_features
from piece_cl.evaluation.sharding import Shard

# lm-evaluation-harness's HumanEval stop sequences: a new top-level statement ends the function.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def postprocess_completion(text: str, style: str = "authors") -> str:
    """The function body to execute from a raw completion.

    "authors" (docs/paper-notes.md §3): strip leading newlines, then cut at the first blank line.
    "stop_sequences": cut at the first lm-evaluation-harness stop sequence.
    """
    if style == "authors":
        return text.lstrip("\n").split("\n\n")[0]
    if style == "stop_sequences":
        cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
        return text[:cut]
    raise ValueError(f"unknown completion style '{style}' (authors | stop_sequences)")


def build_program(problem: dict, completion: str) -> str:
    """A complete program that exits non-zero when the completion fails the problem's tests."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def build_candidate(problem: dict, completion: str) -> Candidate:
    """The model's code (prompt + completion) for the sandbox, the problem's test for the harness."""
    return Candidate(program=problem["prompt"] + completion + "\n", prompt=problem["prompt"],
                     test=problem["test"], entry_point=problem["entry_point"])


@dataclass
class CodeProbe:
    """A general-ability probe: completions decoded as `eval.*` says, scored by their unit tests."""

    name: str
    problems: list[dict]
    max_new_tokens: int = 128
    timeout: float = 5.0
    batch_size: int | None = None  # None: the eval config's batch size
    style: str = "authors"
    allow_weaker_sandbox: bool = False  # run model code even where the kernel lacks a sandbox feature

    def __post_init__(self):
        sandbox_features(self.allow_weaker_sandbox)  # refuse now, before any training, not at the probe

    def evaluate(self, model, tokenizer, gen_cfg, shard: Shard | None = None) -> tuple[float, list[dict]]:
        """(pass@1 on 0..100, one record per problem with its completion and execution status).

        With `shard`, this rank generates its share of the completions and executes its share of the
        programs; every rank returns the gathered records.
        """
        shard = shard or Shard()
        raw = generate_for_eval(model, tokenizer, [p["prompt"] for p in self.problems], gen_cfg, self.max_new_tokens,
                                batch_size=self.batch_size, shard=shard, cut_prompts=False)
        completions = [postprocess_completion(text, self.style) for text in raw]
        results = shard.map(
            lambda candidates: check_candidates(candidates, timeout=self.timeout,
                                                allow_weaker=self.allow_weaker_sandbox),
            [build_candidate(p, c) for p, c in zip(self.problems, completions)])
        records = [
            {"task_id": p["task_id"], "completion": c, "passed": r.passed, "status": r.status}
            for p, c, r in zip(self.problems, completions, results)
        ]
        score = 100.0 * sum(r.passed for r in results) / len(results) if results else 0.0
        return score, records
