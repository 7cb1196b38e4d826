"""Deterministic crash points for the kill-and-resume tests.

`PIECE_KILL_AT=<point>@<stage>` SIGKILLs the process when the loop reaches that point of that stage
(points: `step` — after the first optimiser step, `epoch` — after the first epoch's checkpoint, `eval` —
after the first task's evaluation, `commit` — after the stage checkpoint, before results.json). Unset in normal runs: a no-op.
"""
import os
import signal


def maybe_kill(point: str, stage: int) -> None:
    if os.environ.get("PIECE_KILL_AT") == f"{point}@{stage}":
        os.kill(os.getpid(), signal.SIGKILL)
