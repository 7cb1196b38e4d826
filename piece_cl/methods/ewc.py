"""EWC: a quadratic pull towards the weights each task ended with, weighted by the diagonal Fisher.

After task t the Fisher F_t at θ*_t comes from per-sample gradients of the answer log-likelihood on
that task's training data (`importance.estimate`, kind "fisher"). Fishers are summed across tasks
(F = Σ_t F_t) and the anchor is the latest θ*, so the state stays two model-sized tensors however many
tasks pass. Loss = CE + λ Σ_i F_i (θ_i − θ*_i)²  (λ 0.5; the authors' code: 200).

The authors accumulated F from the training gradients along the trajectory and never reset it
(NOTES §3); protocol=official_code offers their λ, not that estimate.

Cost: + 2 × the trainable parameters in `fisher_dtype` (Fisher and θ*; `fisher_device: cpu` keeps them
off the accelerator), one per-sample gradient pass over the task after training, and an elementwise
penalty per micro-batch.
"""
from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from piece_cl.errors import PieceError
from piece_cl.importance import estimate
from piece_cl.methods.base import Method, StageContext, register_method


def state_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PieceError(f"method.fisher_dtype must be a floating torch dtype (float32, bfloat16, ...), got {name!r}")
    return dtype


def sample_records(records: list[dict], n: int | None, seed: int) -> list[dict]:
    """`n` records drawn uniformly without replacement with `seed` (all of them when n is None)."""
    if n is None or n >= len(records):
        return list(records)
    return random.Random(seed).sample(records, int(n))


@register_method
class EWC(Method):
    name = "ewc"
    zero3_blocker = "its penalty reads whole parameters in the loss"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def penalty(self, model: nn.Module) -> Tensor:
        """λ Σ F (θ − θ*)² over the parameters that carry a Fisher (differentiable in θ)."""
        terms = []
        for name, param in model.named_parameters():
            if name in self.fisher:
                fisher = self.fisher[name].to(param.device, torch.float32)
                delta = param.float() - self.anchor[name].to(param.device, torch.float32)
                terms.append((fisher * delta * delta).sum())
        return float(self.cfg.lam) * torch.stack(terms).sum()

    def loss(self, ctx: StageContext, batch, out) -> Tensor:
        return out.loss + self.penalty(ctx.model) if self.fisher else out.loss

    def after_task(self, ctx: StageContext) -> None:
        records = sample_records(ctx.task.train, self.cfg.get("fisher_samples"), ctx.seed + ctx.t)
        features = ctx.engine.encode(records)
        size = ctx.engine.micro_batch_size
        batches = (ctx.engine.batch(features[i : i + size]) for i in range(0, len(features), size))
        fisher = estimate(ctx.model, batches, kind="fisher", eligible=self.trainable(ctx.model), chunk_size=size)
        dtype = state_dtype(self.cfg.get("fisher_dtype", "float32"))
        params = dict(ctx.model.named_parameters())
        for name, value in fisher.items():
            device = self.cfg.get("fisher_device") or params[name].device
            value = value.to(device, dtype)
            self.fisher[name] = self.fisher[name] + value if name in self.fisher else value
            self.anchor[name] = params[name].detach().to(device, dtype, copy=True)
        ctx.log(f"ewc: Fisher of '{ctx.task.name}' from {len(records)} samples added ({len(fisher)} tensors)")

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.fisher = dict(state.get("fisher", {}))
        self.anchor = dict(state.get("anchor", {}))
