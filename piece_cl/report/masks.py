"""Selected-parameter masks: where they sit (Figure 3), how tasks share them (Figure 5), and whether
sharing predicts forgetting (Figure 6 / Table 4).

A mask file (stage_<t>_<task>/mask.safetensors) maps a parameter name to the sorted int64 flat indices
of its selected entries. The paper's Figure 3 abbreviations are Q K V O G U D IN PN N lm; parameters
the paper's Llama-style list has no name for get their own short label (QN KN for Qwen3's q_norm /
k_norm, preFF postFF for Gemma2's feed-forward norms, E for embeddings, other for anything else).
Vision towers and multimodal projectors are not part of the language model and are left out (piece_cl/scope.py).
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from scipy import stats

from piece_cl.errors import PieceError
from piece_cl.scope import is_vision

Mask = dict[str, np.ndarray]

PAPER_MODULES = ["Q", "K", "V", "O", "G", "U", "D", "IN", "PN", "N", "lm"]
EXTRA_MODULES = ["QN", "KN", "preFF", "postFF", "E", "other"]

# The first key found in the name after `layers.<i>.` names the module.
LAYER_MODULES = [
    ("q_proj", "Q"), ("k_proj", "K"), ("v_proj", "V"), ("o_proj", "O"),
    ("gate_proj", "G"), ("up_proj", "U"), ("down_proj", "D"),
    ("input_layernorm", "IN"), ("post_attention_layernorm", "PN"),
    ("pre_feedforward_layernorm", "preFF"), ("post_feedforward_layernorm", "postFF"),
    ("q_norm", "QN"), ("k_norm", "KN"),
]
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def module_of(name: str) -> tuple[str, int | None] | None:
    """(module abbreviation, layer or None) of a parameter name; None for vision-side parameters."""
    if is_vision(name):
        return None
    match = LAYER_INDEX.search(name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        return next((abbr for key, abbr in LAYER_MODULES if key in rest), "other"), layer
    if "lm_head" in name:
        return "lm", None
    if "embed_tokens" in name:
        return "E", None
    if re.search(r"(?:^|\.)norm\.weight$", name):
        return "N", None
    return "other", None


def load_mask(path: Path) -> Mask:
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' SafetensorError for a truncated or foreign file
        raise PieceError(f"{path} is not a readable mask ({str(err).splitlines()[0][:200]}); rerun that stage, or "
                         "move the file away to report without its mask figures") from None
    return {name: np.asarray(indices, dtype=np.int64) for name, indices in tensors.items()}


def mask_size(mask: Mask) -> int:
    return sum(int(indices.size) for indices in mask.values())


def intersection_size(a: Mask, b: Mask) -> int:
    return sum(
        int(np.intersect1d(a[name], b[name], assume_unique=True).size) for name in a.keys() & b.keys()
    )


def overlap(a: Mask, b: Mask) -> float:
    """|M_a ∩ M_b| / k, k = the number of selected entries (the smaller mask if sizes ever differ)."""
    k = min(mask_size(a), mask_size(b))
    return intersection_size(a, b) / k if k else float("nan")


def overlap_matrix(masks: list[Mask]) -> np.ndarray:
    n = len(masks)
    matrix = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = overlap(masks[i], masks[j])
    return matrix


def module_counts(masks: list[Mask]) -> Counter:
    """Selected entries per (module, layer) summed over masks; layer None for N, lm and E."""
    counts: Counter = Counter()
    for mask in masks:
        for name, indices in mask.items():
            where = module_of(name)
            if where is not None:
                counts[where] += int(indices.size)
    return counts


def pair_forgetting(R: list[list[float]]) -> dict[tuple[int, int], float]:
    """Forgetting of pair (i, j), i < j: R_{j-1,i} − R_{j,i}, the drop of task i's score while learning j."""
    return {(i, j): R[j - 1][i] - R[j][i] for j in range(1, len(R)) for i in range(j)}


@dataclass(frozen=True)
class Correlation:
    pairs: list[tuple[int, int]]
    overlaps: list[float]
    forgetting: list[float]
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float

    @property
    def n(self) -> int:
        return len(self.pairs)


def overlap_forgetting(masks: list[Mask | None], R: list[list[float]]) -> Correlation:
    """Pearson and Spearman between pairwise mask overlap and pair forgetting, over pairs with both masks.

    NaN statistics when fewer than 3 pairs or either series is constant (undefined correlation).
    """
    pairs, overlaps, forgetting = [], [], []
    for (i, j), drop in pair_forgetting(R).items():
        if i < len(masks) and j < len(masks) and masks[i] is not None and masks[j] is not None:
            pairs.append((i, j))
            overlaps.append(overlap(masks[i], masks[j]))
            forgetting.append(drop)
    nan = float("nan")
    if len(pairs) < 3 or len(set(overlaps)) < 2 or len(set(forgetting)) < 2:
        return Correlation(pairs, overlaps, forgetting, nan, nan, nan, nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = stats.pearsonr(overlaps, forgetting)
        spearman = stats.spearmanr(overlaps, forgetting)
    values = [float(pearson.statistic), float(pearson.pvalue), float(spearman.statistic), float(spearman.pvalue)]
    return Correlation(pairs, overlaps, forgetting, *[v if math.isfinite(v) else nan for v in values])
