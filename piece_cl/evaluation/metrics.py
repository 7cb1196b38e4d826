"""Continual-learning summaries of the R matrix, exactly as docs/paper-notes.md §2 defines them.

R is lower-triangular: row t holds the scores on tasks 0..t after learning task t (0-based here,
1-based in the paper). Every summary is a list with one value per stage so curves come for free.
"""
from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> None:
    for t, row in enumerate(R):
        if len(row) < t + 1:
            raise ValueError(f"R row {t} has {len(row)} entries, needs {t + 1}")


def op(R: Matrix) -> list[float]:
    """OP_t = (1/t) Σ_{i≤t} R_{t,i}: mean score over the tasks seen so far."""
    _check(R)
    return [sum(row[: t + 1]) / (t + 1) for t, row in enumerate(R)]


def bwt(R: Matrix) -> list[float]:
    """BWT_t = (1/t) Σ_{i<t} (R_{t,i} − R_{i,i}), 1-based t: the paper divides by t, not t−1.

    The authors' tables report BWT after the second-to-last task (Py150 excluded): `bwt(R)[-2]`.
    """
    _check(R)
    return [sum(row[i] - R[i][i] for i in range(t)) / (t + 1) for t, row in enumerate(R)]


def ap(R: Matrix) -> list[float]:
    """AP_t = (1/t) Σ_{i≤t} R_{i,i}: mean of the just-learned scores (Figure 7)."""
    _check(R)
    diagonal = [R[i][i] for i in range(len(R))]
    return [sum(diagonal[: t + 1]) / (t + 1) for t in range(len(R))]
