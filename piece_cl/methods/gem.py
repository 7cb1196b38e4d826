"""GEM: never let a step increase the loss on a memory of any past task (Lopez-Paz & Ranzato, 2017).

Each step, a reference gradient g_k of the loss on task k's episodic memory is taken for every past task;
if the current gradient g has ⟨g, g_k⟩ < 0 for some k, it is replaced by the closest vector g̃ with
⟨g̃, g_k⟩ ≥ margin for all k: the dual QP  min_v ½ vᵀ(GGᵀ)v + (Gg)ᵀv, v ≥ 0 over t−1 ≤ 7 variables
(quadprog), then g̃ = g + Gᵀv. The projection is global over the *flattened* gradient of every trainable
tensor (the authors projected per tensor, and under ZeRO-2 most likely never, docs/paper-notes.md §3); dot products
are summed tensor by tensor, so no concatenated copy of the model's gradient is ever formed.

Reference gradients come from `torch.autograd.grad`, which never touches `.grad`: the current gradient
needs no saving and restoring, and no engine hook (DeepSpeed's reduction) fires for the extra passes.
The current gradient is read and written only through `ctx.engine.get_grad/set_grad`.

Cost: + (t−1) × the trainable parameters in `grad_dtype` (one reference gradient per past task; on
`grad_device` if set), + (t−1) forward/backward passes over `memory_per_task` samples per step.
"""
from __future__ import annotations

import numpy as np
import quadprog
import torch
from torch import Tensor

from piece_cl.methods.base import Method, StageContext, register_method
from piece_cl.methods.ewc import sample_records, state_dtype

# Added to the Gram diagonal, relative to its largest entry: keeps the QP strictly convex when two memories'
# gradients are parallel, without moving the solution measurably (GEM's absolute 1e-3 would, for small gradients).
_RIDGE = 1e-9


def dual_weights(gram: np.ndarray, dots: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """v ≥ margin minimising ½ vᵀ gram v + dotsᵀ v, with gram = GGᵀ and dots = Gg (GEM's dual)."""
    k = len(gram)
    gram = 0.5 * (gram + gram.T) + (_RIDGE * max(float(np.abs(gram).max()), 1e-30)) * np.eye(k)
    return quadprog.solve_qp(gram.astype(np.float64), -dots.astype(np.float64), np.eye(k), np.full(k, margin))[0]


def project(g: Tensor, memories: Tensor, margin: float = 0.0) -> Tensor:
    """The flat gradient `g` projected so ⟨g̃, g_k⟩ ≥ 0 for each row g_k of `memories` (unchanged if it holds)."""
    dots = memories.double() @ g.double()
    if bool((dots >= 0).all()):
        return g
    v = dual_weights((memories.double() @ memories.double().T).numpy(), dots.numpy(), margin)
    return g + (torch.from_numpy(v).to(memories.dtype) @ memories).to(g.dtype)


@register_method
class GEM(Method):
    name = "gem"
    zero3_blocker = "its reference gradients need whole parameters and backward passes of their own"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.memories: list[list[dict]] = []  # real samples of each past task
        self.projections = 0

    def _reference_gradient(self, ctx: StageContext, params, records: list[dict]) -> list[Tensor]:
        """Gradient of the mean answer loss on `records`, as (param-shaped) tensors, `.grad` untouched."""
        features = ctx.engine.encode(records)
        size = ctx.engine.micro_batch_size
        dtype = state_dtype(self.cfg.get("grad_dtype", "float32"))
        device = self.cfg.get("grad_device")
        total = [torch.zeros(p.shape, dtype=dtype, device=device or p.device) for _, p in params]
        for start in range(0, len(features), size):
            micro = features[start : start + size]
            loss = ctx.model(**ctx.engine.batch(micro)).loss * (len(micro) / len(features))
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            for acc, grad in zip(total, grads):
                if grad is not None:
                    acc += grad.to(acc.device, dtype)
        return total

    def after_backward(self, ctx: StageContext) -> None:
        if not self.memories:
            return
        params = self.trainable(ctx.model)
        current = [ctx.engine.get_grad(n, p) for n, p in params]
        current = [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(current, params)]
        references = [self._reference_gradient(ctx, params, memory) for memory in self.memories]

        def dot(a: list[Tensor], b: list[Tensor]) -> float:
            return sum(float((x.double() * y.to(x.device).double()).sum()) for x, y in zip(a, b))

        dots = np.array([dot(ref, current) for ref in references])
        if (dots >= 0).all():
            return
        gram = np.array([[dot(a, b) for b in references] for a in references])
        v = dual_weights(gram, dots, float(self.cfg.margin))
        for i, (name, param) in enumerate(params):
            update = sum(float(w) * ref[i].to(param.device, torch.float32) for w, ref in zip(v, references))
            ctx.engine.set_grad(name, param, current[i].float() + update)
        self.projections += 1

    def step_scalars(self) -> dict[str, float]:
        return {"gem_projections": float(self.projections)} if self.memories else {}

    def after_task(self, ctx: StageContext) -> None:
        memory = sample_records(ctx.task.train, int(self.cfg.memory_per_task), ctx.seed + ctx.t)
        self.memories.append(memory)
        ctx.log(f"gem: {len(memory)} samples of '{ctx.task.name}' kept; {self.projections} steps projected so far")

    def state_dict(self) -> dict:
        return {"memories": self.memories, "projections": self.projections}

    def load_state_dict(self, state: dict) -> None:
        self.memories = list(state.get("memories", []))
        self.projections = int(state.get("projections", 0))
