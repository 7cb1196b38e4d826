"""What continual learning may train: the one definition of scope, used by every method, importance and the report.

Out of scope are
- the token and position embeddings (the authors froze them; a method with `freeze_embeddings: false`
  takes them back), and
- on multimodal models, the vision side: the vision tower and the projector into the language model
  (LLaVA's `vision_tower` / `multi_modal_projector`, Qwen3-VL's `visual`, whose merger is its projector).
  LLaVA-style instruction tuning keeps the vision encoder frozen, so the paper's multimodal rows compare
  methods on the language model only; a method with `train_vision: true` takes the vision side back.

Parameter names are matched as dotted paths, so `visual.` never matches `visualise` and `wte.` never
matches `bwte`. `exclude_patterns` gives the same rule as regular expressions for `importance`'s
pattern-based selection, so both read one list.
"""
from __future__ import annotations

import re

EMBEDDING_PATTERN = r"(^|\.)(embed_tokens|embed_positions|word_embeddings|wte|wpe)\."
VISION_PATTERN = r"(^|\.)(vision_tower|vision_model|visual|multi_modal_projector|mm_projector)\."
_EMBEDDING = re.compile(EMBEDDING_PATTERN)
_VISION = re.compile(VISION_PATTERN)


def is_embedding(name: str) -> bool:
    return bool(_EMBEDDING.search(name))


def is_vision(name: str) -> bool:
    """A parameter of a vision tower or of the projector from it into the language model."""
    return bool(_VISION.search(name))


def _get(method_cfg, key: str, default: bool) -> bool:
    return bool(method_cfg.get(key, default)) if method_cfg is not None else default


def out_of_scope(name: str, method_cfg=None) -> bool:
    """True when the parameter `name` stays frozen under the method configured by `method_cfg`."""
    if is_embedding(name) and _get(method_cfg, "freeze_embeddings", True):
        return True
    return is_vision(name) and not _get(method_cfg, "train_vision", False)


def exclude_patterns(method_cfg=None) -> tuple[str, ...]:
    """`out_of_scope` as regular expressions, plus the method's own `exclude:` patterns if it has any."""
    patterns = []
    if _get(method_cfg, "freeze_embeddings", True):
        patterns.append(EMBEDDING_PATTERN)
    if not _get(method_cfg, "train_vision", False):
        patterns.append(VISION_PATTERN)
    extra = method_cfg.get("exclude", None) if method_cfg is not None else None
    return tuple(patterns) + tuple(extra or ())
