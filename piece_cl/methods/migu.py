"""MIGU: before each task, let only the linear-layer channels with the largest outputs on it learn.

As the PIECE paper describes MIGU (Du et al., 2024): the score of output channel i of a linear layer
is ‖W_i x‖₁ summed over the task's tokens (forward hooks over the training data, before the task); the
top `ratio` of all output channels, ranked globally (`importance.select_top_k` over per-row scores,
k = floor(ratio × number of rows)), are the rows that train. Everything else is frozen: tensors with no
selected row get no gradient at all, norms and biases do not train.

`variant: piece_code` is what the authors' code did (docs/paper-notes.md §3): score the hidden-state channels
entering each linear (Σ|x_c| over tokens), unmask the top `ratio` of *input columns* per layer (at
least one), and train down_proj, lm_head and the final norm fully.

Masks act through gradient hooks on the parameters (`engine.hook_grad`), so they apply before any
reduction, whichever engine runs. Masked entries of a partly selected tensor get a zero gradient, which
Adam turns into an exactly zero update; decoupled weight decay would still move them, so masked tensors
train with weight_decay 0 (the paper's setting anyway). Each stage writes `mask.safetensors`
(name -> sorted int64 flat indices; fully trainable tensors listed in its metadata).

Cost: one forward pass over the task before it; masks of one bool per row/column; a step costs what
SeqFT's does minus the weight gradients of frozen tensors; Adam state for the partly selected tensors.
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from piece_cl.io import atomic_save_safetensors
from piece_cl.importance import select_top_k
from piece_cl.methods.base import Method, StageContext, register_method
from piece_cl.methods.ewc import sample_records
from piece_cl.scope import exclude_patterns

FULLY_TRAINED_IN_CODE = re.compile(r"(^|\.)(down_proj|lm_head)\.weight$|(^|\.)norm\.weight$")


class _ChannelScores:
    """Forward hooks summing |W x| per output row (paper) or |x| per input column (piece_code) over real tokens."""

    def __init__(self, linears: dict[str, nn.Linear], by_input: bool):
        self.by_input = by_input
        self.tokens: Tensor | None = None
        self.scores: dict[str, Tensor] = {}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Linear, args, output: Tensor) -> None:
            values = args[0] if self.by_input else output - (module.bias if module.bias is not None else 0)
            keep = self.tokens.reshape(*values.shape[:-1], 1).to(torch.float32)
            score = (values.float().abs() * keep).reshape(-1, values.shape[-1]).sum(0)
            self.scores[name] = self.scores[name] + score if name in self.scores else score
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@register_method
class MIGU(Method):
    name = "migu"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.handles: list = []
        self.masked: set[str] = set()

    def setup(self, model: nn.Module) -> nn.Module:
        model = super().setup(model)  # freezes what is out of scope
        exclude = [re.compile(p) for p in exclude_patterns(self.cfg)]
        self.eligible = [n for n, p in model.named_parameters()
                         if p.requires_grad and not any(x.search(n) for x in exclude)]
        return model

    def _score(self, ctx: StageContext, linears: dict[str, nn.Linear], by_input: bool) -> dict[str, Tensor]:
        records = sample_records(ctx.task.train, self.cfg.get("samples"), ctx.seed + ctx.t)
        features = ctx.engine.encode(records)
        size = ctx.engine.micro_batch_size
        hooks = _ChannelScores(linears, by_input)
        was_training = ctx.model.training
        try:
            ctx.model.eval()
            with torch.no_grad():
                for start in range(0, len(features), size):
                    batch = ctx.engine.batch(features[start : start + size])
                    hooks.tokens = batch["attention_mask"]
                    ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            hooks.close()
            ctx.model.train(was_training)
        return hooks.scores

    def _select(self, scores: dict[str, Tensor], by_input: bool) -> dict[str, Tensor]:
        """Selected rows (paper: global top-k) or columns (piece_code: top ratio of each layer, ≥ 1)."""
        ratio = float(self.cfg.ratio)
        if not by_input:
            return select_top_k(scores, ratio)
        return {name: torch.topk(s, max(1, math.floor(ratio * s.numel()))).indices.sort().values
                for name, s in scores.items()}

    def before_task(self, ctx: StageContext) -> None:
        by_input = self.cfg.variant == "piece_code"
        params = dict(ctx.model.named_parameters())
        full = {n for n in self.eligible if by_input and FULLY_TRAINED_IN_CODE.search(n)}
        linears = {f"{name}.weight": m for name, m in ctx.model.named_modules()
                   if isinstance(m, nn.Linear) and f"{name}.weight" in self.eligible and f"{name}.weight" not in full}
        chosen = self._select(self._score(ctx, linears, by_input), by_input)
        masks: dict[str, Tensor] = {}
        for name in self.eligible:
            param = params[name]
            param.requires_grad_(name in full or name in chosen)
            if name not in chosen:
                continue
            rows, cols = param.shape
            keep = torch.zeros(cols if by_input else rows, dtype=param.dtype, device=param.device)
            keep[chosen[name].to(param.device)] = 1
            keep = keep.reshape(1, cols) if by_input else keep.reshape(rows, 1)
            self.handles.append(ctx.engine.hook_grad(param, lambda grad, keep=keep: grad * keep.to(grad.dtype)))
            index = chosen[name][None, :] + cols * torch.arange(rows)[:, None] if by_input else \
                (chosen[name][:, None] * cols + torch.arange(cols)[None, :])
            masks[name] = index.flatten().sort().values.contiguous()
        self.masked = set(chosen)
        if ctx.engine.is_main:  # every rank holds the same mask; one writes it
            atomic_save_safetensors(ctx.stage_dir / "mask.safetensors", masks,
                                    metadata={"fully_trainable": ",".join(sorted(full))})
        entries = sum(m.numel() for m in masks.values())
        ctx.log(f"migu ({self.cfg.variant}): {entries} entries in {len(masks)} tensors unmasked, "
                f"{len(full)} fully trainable, {len(self.eligible) - len(masks) - len(full)} frozen")

    def build_optimizer(self, ctx: StageContext, params, optimizer_factory):
        masked = [p for n, p in params if n in self.masked]
        others = [p for n, p in params if n not in self.masked]
        groups = ([{"params": masked, "weight_decay": 0.0}] if masked else []) + ([{"params": others}] if others else [])
        return optimizer_factory(groups)

    def after_task(self, ctx: StageContext) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
