"""PIECE (shared by PIECE-F and PIECE-S): before each task, score every eligible entry on the task's
data, keep the global top k = floor(ratio·|θ|), and train only those entries (docs/paper-notes.md §1).

Entries outside the mask keep their exact bits through the task: tensors with no selected entry are
frozen (no gradient at all), and the selected ones are updated by `training.sparse.SparseMaskedAdam`,
which keeps Adam state for the k entries only. The optimiser is fresh for every task, as in the
authors' runs (one process per task). `unselected=train` reproduces the authors' bug (docs/paper-notes.md §3:
tensors with no selected entry trained fully) for comparison only.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from piece_cl.data.authors_importance import batch_size_for_task, importance_features
from piece_cl.errors import PieceError
from piece_cl.io import atomic_save_safetensors
from piece_cl.importance import DEFAULT_XI, ShardedScores, eligible_parameters, estimate, select_top_k, top_k_size
from piece_cl.methods.base import Method, StageContext
from piece_cl.scope import exclude_patterns
from piece_cl.tracking.stats import importance_statistics
from piece_cl.training.sparse import AdamSettings, SparseMaskedAdam

logger = logging.getLogger(__name__)

UNSELECTED_CHOICES = ("freeze", "train")
AUTHORS_XI_ON_SUMS = 1.0


class Piece(Method):
    """Top-k importance mask per task; `kind` is the importance of Eq. 4 ("fisher") or Eq. 10 ("s")."""

    kind: ClassVar[str]
    optimizer_outside_zero = True  # SparseMaskedAdam: data parallel, replicated, never partitioned

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.unselected not in UNSELECTED_CHOICES:
            raise PieceError(f"method.unselected must be one of {UNSELECTED_CHOICES}, got {cfg.unselected!r}")
        self.masks: dict[str, Tensor] = {}
        self.fully_trained: list[str] = []  # unselected=train only: eligible tensors without selections
        self.optimizer: SparseMaskedAdam | None = None
        self.importance_work: dict = {}  # what this rank's last estimate did (samples, bytes of sums)
        self.importance_stats: dict[str, float] = {}

    def setup(self, model: nn.Module) -> nn.Module:
        """Refuse a ratio whose k is 0 or more than the eligible entries now, not after loading and probing."""
        model = super().setup(model)
        eligible = eligible_parameters(model, exclude=exclude_patterns(self.cfg))
        top_k_size(float(self.cfg.ratio), sum(p.numel() for p in model.parameters()), sum(p.numel() for _, p in eligible))
        return model

    # -- before the task: importance and mask ---------------------------------------------------
    def before_task(self, ctx: StageContext) -> None:
        model = ctx.model
        eligible = eligible_parameters(model, exclude=exclude_patterns(self.cfg))
        imp = self.cfg.importance
        self.importance_work = {}
        scores = estimate(model, self._importance_batches(ctx), self.kind, xi=self._xi(),
                          granularity=imp.granularity, chunk_size=int(imp.chunk_size), eligible=eligible,
                          reduction=imp.reduction, xi_on_sums=bool(imp.xi_on_sums),
                          shard_moments=bool(imp.get("shard_moments", True)), moments_device=imp.get("moments_device"),
                          accumulate=str(imp.get("accumulate", "float32")), work=self.importance_work)
        total = sum(p.numel() for p in model.parameters())  # |θ| with embeddings, as the authors counted
        self.masks = select_top_k(scores, float(self.cfg.ratio), total=total)
        # sharded scores: the quantiles of this rank's own entries (the mask and k are global)
        local = scores.local if isinstance(scores, ShardedScores) else scores
        self.importance_stats = importance_statistics(local, self.masks, len(eligible))
        del scores
        if ctx.engine.is_main:  # every rank holds the same mask; one writes it
            atomic_save_safetensors(ctx.stage_dir / "mask.safetensors", {n: i.contiguous() for n, i in self.masks.items()})
        empty = [name for name, _ in eligible if name not in self.masks]
        self.fully_trained = empty if self.cfg.unselected == "train" else []
        k = sum(idx.numel() for idx in self.masks.values())
        work = self.importance_work
        ctx.log(f"{self.name}: importance on {work['samples_here']} of {work['samples']} samples on this rank "
                f"(world {work['world']}), {work['moment_bytes'] / 2**20:.1f} MiB of sums held here")
        ctx.log(f"{self.name}: k = {k} of |θ| = {total} (ratio {self.cfg.ratio}); {len(self.masks)} tensors hold "
                f"selections, {len(empty)} of {len(eligible)} eligible tensors hold none")
        if self.fully_trained:
            warning = (f"WARNING method.unselected=train reproduces the authors' bug: {len(self.fully_trained)} "
                       "tensors with no selected entry train FULLY (dense Adam); not the paper's method")
            ctx.log(warning)
            logger.warning(warning)
        trained = set(self.masks) | set(self.fully_trained)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trained)

    def stage_scalars(self) -> dict[str, float]:
        return dict(self.importance_stats)

    def _xi(self) -> float:
        """ξ of Eq. 10: tiny on means (the paper), 1 on sums (the authors' code) unless set."""
        imp = self.cfg.importance
        if imp.xi is not None:
            return float(imp.xi)
        return AUTHORS_XI_ON_SUMS if imp.xi_on_sums else DEFAULT_XI

    def _importance_batches(self, ctx: StageContext) -> Iterator[dict[str, Tensor]]:
        """Task records tokenised as training sees them, or as the authors' collator did
        (`importance.truncation`); right padding, labels -100 off the labelled tail.

        No attention mask: under causal attention right padding cannot reach the answer tokens.
        """
        imp = self.cfg.importance
        records = ctx.task.train if imp.samples is None else ctx.task.train[: int(imp.samples)]
        features = importance_features(ctx.tokenizer, records, imp.get("truncation", "training"), ctx.engine.encode,
                                       imp.get("max_prompt_len"), imp.get("max_answer_len"))
        size = int(imp.chunk_size) if imp.granularity == "sample" else batch_size_for_task(imp.batch_size, ctx.task.name)
        ctx.log(f"{self.name}: importance on {len(features)} records, per {imp.granularity}"
                f"{'' if imp.granularity == 'sample' else f' of {size}'}, {imp.get('truncation', 'training')} encoding")
        for start in range(0, len(features), size):
            batch = ctx.engine.batch(features[start : start + size])
            yield {"input_ids": batch["input_ids"], "labels": batch["labels"]}

    # -- training ---------------------------------------------------------------------------------
    def trainable(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        trained = set(self.masks) | set(self.fully_trained)
        return [(name, param) for name, param in model.named_parameters() if name in trained]

    def build_optimizer(self, ctx: StageContext, params, optimizer_factory) -> SparseMaskedAdam:
        if not self.masks:
            raise PieceError(f"{self.name}: no mask for task '{ctx.task.name}' (before_task did not run)")
        self._close_optimizer()
        dense = [param for name, param in params if name not in self.masks]
        self.optimizer = SparseMaskedAdam(
            ctx.model, self.masks, AdamSettings.from_factory(optimizer_factory),
            dense=optimizer_factory(dense) if dense else None,
            fast_linear=bool(self.cfg.get("fast_linear", True)),
        )
        return self.optimizer

    def after_task(self, ctx: StageContext) -> None:
        self._close_optimizer()

    def _close_optimizer(self) -> None:
        if self.optimizer is not None:
            self.optimizer.close()
            self.optimizer = None

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: idx.clone() for name, idx in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {name: torch.as_tensor(idx, dtype=torch.long) for name, idx in state.get("masks", {}).items()}
