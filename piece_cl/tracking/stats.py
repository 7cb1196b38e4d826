"""Summaries of PIECE's importance scores for tracking (read-only: the scores and masks are not changed)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

QUANTILES = (0.5, 0.9, 0.99, 0.999)
SAMPLE = 1_000_000  # torch.quantile's input limit is 16M; a strided sample of this size is exact enough


def importance_statistics(scores: dict[str, Tensor], masks: dict[str, Tensor], eligible: int) -> dict[str, float]:
    """k, tensors with and without selections, and score quantiles over every eligible entry.

    The quantiles come from a deterministic strided sample (no random stream is touched), so an 8B
    model's scores cost a 1M-element copy, not a second copy of the scores.
    """
    k = sum(int(index.numel()) for index in masks.values())
    stats = {"k": float(k), "tensors_selected": float(len(masks)), "tensors_without": float(eligible - len(masks))}
    total = sum(score.numel() for score in scores.values())
    if total == 0:
        return stats
    stride = max(1, math.ceil(total / SAMPLE))
    sample = torch.cat([score.detach().reshape(-1)[::stride].float().cpu() for score in scores.values()])
    values = torch.quantile(sample, torch.tensor(QUANTILES))
    for q, value in zip(QUANTILES, values.tolist()):
        stats[f"score_q{format(q * 100, 'g').replace('.', '_')}"] = value
    stats["score_max"] = max(float(score.detach().max()) for score in scores.values() if score.numel())
    return stats
