"""EWC: a quadratic pull towards the weights each task ended with, weighted by the diagonal Fisher.

After task t the Fisher F_t at θ*_t comes from per-sample gradients of the answer log-likelihood on
that task's training data (`importance.estimate`, kind "fisher"). Fishers are summed across tasks
(F = Σ_t F_t) and the anchor is the latest θ*, so the state stays two model-sized tensors however many
tasks pass. Loss = CE + λ Σ_i F_i (θ_i − θ*_i)²  (λ 0.5; the authors' code: 200).

`fisher_source: training` (protocol=official_code) is the authors' estimate instead (docs/paper-notes.md §3): every
micro-batch's training gradient — of the whole loss, penalty included — squared and divided by the
micro-batches per epoch, added to F as training goes, over every epoch and task, never reset; the
penalty applies from the second task on. Their gradient was of loss / accumulation on each of their
`fisher_ranks` (4) GPUs, i.e. `fisher_ranks` times the one-process share-weighted gradient, so F (and
the effective λ) grew with the square of their GPU count at equal global batch. Here the micro-batch
gradient is taken as on `fisher_ranks` ranks whatever the world size, and the ranks' Fishers are
averaged after each task, so a run gives the same F on 1 or N ranks.

Cost: + 2 × the trainable parameters in `fisher_dtype` (Fisher and θ*; `fisher_device: cpu` keeps them
off the accelerator), one per-sample gradient pass over the task after training (or, with
`fisher_source: training`, a square-and-add per gradient), and an elementwise penalty per micro-batch.
"""
from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from piece_cl.errors import PieceError
from piece_cl.importance import estimate, whole_scores
from piece_cl.methods.base import Method, StageContext, StepMeans, register_method


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


FISHER_SOURCES = ("posterior", "training")


@register_method
class EWC(Method):
    name = "ewc"
    zero3_blocker = "its penalty reads whole parameters in the loss"

    def __init__(self, cfg):
        super().__init__(cfg)
        source = cfg.get("fisher_source", "posterior")
        if source not in FISHER_SOURCES:
            raise PieceError(f"method.fisher_source must be one of {FISHER_SOURCES}, got {source!r}")
        self.online = source == "training"
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.handles: list = []
        self.fisher_work: dict = {}  # what this rank's last Fisher estimate did (samples, bytes of sums)
        self.tracked = StepMeans()

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
        if not (self.fisher and self.anchor):
            return out.loss
        penalty = self.penalty(ctx.model)
        self.tracked.add(ctx.engine.global_step, "ewc_penalty", penalty)
        return out.loss + penalty

    def step_scalars(self) -> dict[str, float]:
        return self.tracked.means()

    def before_task(self, ctx: StageContext) -> None:
        """`fisher_source: training`: a gradient hook per trainable tensor adds g² / micro-batches per epoch."""
        if not self.online:
            return
        engine = ctx.engine
        micro_batches = -(-len(self.train_records(ctx)) // (engine.micro_batch_size * engine.world_size))
        scale = float(self.cfg.get("fisher_ranks", 1))
        dtype = state_dtype(self.cfg.get("fisher_dtype", "float32"))
        for name, param in self.trainable(ctx.model):
            device = self.cfg.get("fisher_device") or param.device
            self.fisher.setdefault(name, torch.zeros(param.shape, dtype=dtype, device=device))

            def accumulate(grad: Tensor, name: str = name) -> None:  # looked up: a resume replaces the tensors
                fisher = self.fisher[name]
                grad = torch.nan_to_num(grad.detach(), nan=0.0).to(fisher.device, fisher.dtype)
                fisher.add_((grad * scale).pow(2), alpha=1 / micro_batches)

            self.handles.append(engine.hook_grad(param, accumulate))  # the true micro-batch gradient

    def after_task(self, ctx: StageContext) -> None:
        if self.online:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()
            for fisher in self.fisher.values():  # each rank summed its own micro-batches
                ctx.engine.average_across_ranks(fisher)
            self.anchor = {name: param.detach().to(self.fisher[name].device, self.fisher[name].dtype, copy=True)
                           for name, param in self.trainable(ctx.model)}
            ctx.log(f"ewc: online Fisher after '{ctx.task.name}' kept; anchor moved to these weights")
            return
        records = sample_records(ctx.task.train, self.cfg.get("fisher_samples"), ctx.seed + ctx.t)
        features = ctx.engine.encode(records)
        size = ctx.engine.micro_batch_size
        batches = (ctx.engine.batch(features[i : i + size]) for i in range(0, len(features), size))
        # Data parallel over the ranks, sums sharded while estimating; the penalty needs F whole on every rank.
        fisher = whole_scores(estimate(ctx.model, batches, kind="fisher", eligible=self.trainable(ctx.model),
                                       chunk_size=size, moments_device=self.cfg.get("fisher_device"),
                                       work=self.fisher_work))
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
