"""Masked O(k) training: only the k selected entries of the model get gradients, Adam state and updates.

PIECE trains about 0.1% of a model's entries, so dense gradients and dense Adam state would be paid
for entries that never move. `SparseMaskedAdam` keeps one flat fp32 vector per quantity (gradient,
first and second moment, and a master copy when weights are not fp32) holding the selected entries
only, in the order of the sorted flat indices of each tensor.

Gradients reach the flat buffer through gradient hooks, never through `.grad` edits after backward
(so the same logic holds where an engine owns `.grad`, as DeepSpeed does):
- a selected `nn.Linear` weight ("fast path") does not require grad at all; its module runs
  `_SelectedLinear`, whose backward computes the input gradient as usual and, instead of the dense
  weight gradient dYᵀX, only its selected entries Σ_t dY[t, r]·X[t, c] (a sampled dense-dense matmul,
  O(k·tokens) instead of O(rows·cols·tokens)). They flow into a small leaf "anchor" of k_i entries.
- any other selected tensor (norm weights, biases, embeddings) gets its dense gradient as usual; a
  post-accumulate-grad hook gathers the selected entries and frees `.grad` at once.
Both hooks add into the flat buffer, so micro-batches accumulate there.

`step()` is Adam/AdamW on k entries, written back with `index_copy_`: every entry outside the mask
keeps its exact bits whatever the weight decay or eps, since no arithmetic ever touches it.
"""
from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from piece_cl.errors import PieceError


@dataclass(frozen=True)
class AdamSettings:
    """Hyper-parameters of the configured Adam/AdamW; `decoupled` is AdamW's weight decay."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = True

    @classmethod
    def from_factory(cls, factory: Callable) -> "AdamSettings":
        """Read a `functools.partial(torch.optim.AdamW | Adam, lr=..., ...)` (Hydra `_partial_: true`)."""
        func = getattr(factory, "func", None)
        if func not in (torch.optim.AdamW, torch.optim.Adam):
            raise PieceError(f"masked training supports optimizer=adam (torch.optim.Adam/AdamW), got {func or factory}")
        keywords = dict(factory.keywords)
        for flag in ("amsgrad", "maximize"):
            if keywords.get(flag):
                raise PieceError(f"masked training does not support optimizer.{flag}=true")
        defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01 if func is torch.optim.AdamW else 0.0}
        defaults.update(keywords)
        if "lr" not in keywords:
            raise PieceError("the optimizer config sets no lr")
        return cls(lr=float(defaults["lr"]), betas=tuple(float(b) for b in defaults["betas"]),
                   eps=float(defaults["eps"]), weight_decay=float(defaults["weight_decay"]),
                   decoupled=func is torch.optim.AdamW)


class _SelectedLinear(torch.autograd.Function):
    """y = x Wᵀ + b whose backward yields the input gradient and only the selected entries of dL/dW.

    `anchor` (k_i entries, requires grad) carries those entries back to autograd; `pattern` is a CSR
    tensor of the selection (values unused) that tells `sampled_addmm` which entries to compute.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, anchor: Tensor, pattern: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.pattern = pattern
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        rows_out, rows_in = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_bias = rows_out.sum(0) if ctx.needs_input_grad[2] else None
        # sampled_addmm has no bf16 kernel on CPU; fp32 is also what the sparse optimiser accumulates in.
        sampled = torch.sparse.sampled_addmm(ctx.pattern, rows_out.T.float(), rows_in.float(), beta=0.0)
        return grad_x, None, grad_bias, sampled.values(), None


@dataclass
class _Entry:
    """One tensor's share of the flat buffers."""

    name: str
    param: nn.Parameter
    index: Tensor  # sorted int64 flat indices
    start: int
    stop: int
    anchor: Tensor | None = None  # fast path only


class SparseMaskedAdam:
    """Adam(W) over the selected entries of `model` only; `dense` optionally steps other whole tensors.

    Engine-facing API as a torch optimiser: `clip_grad_norm_`, `step`, `zero_grad`; `close()` removes
    hooks and module patches (the method calls it when the task ends).
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor], settings: AdamSettings,
                 dense: torch.optim.Optimizer | None = None, fast_linear: bool = True):
        self.settings = settings
        self.dense = dense
        self.steps = 0
        self._handles: list = []
        self._patched: list[nn.Linear] = []
        params = dict(model.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise PieceError(f"mask names parameters the model does not have: {unknown[:3]}")
        self.entries: list[_Entry] = []
        start = 0
        for name in sorted(masks):
            param = params[name]
            if not param.is_contiguous():
                raise PieceError(f"masked training needs contiguous parameters; {name} is not")
            index = masks[name].to(device=param.device, dtype=torch.long)
            self.entries.append(_Entry(name, param, index, start, start + index.numel()))
            start += index.numel()
        device = self.entries[0].param.device if self.entries else torch.device("cpu")
        zeros = lambda: torch.zeros(start, dtype=torch.float32, device=device)  # noqa: E731
        self.grad, self.exp_avg, self.exp_avg_sq = zeros(), zeros(), zeros()
        # A master copy only where weights are not fp32: fp32 entries are read back from the weights.
        needs_master = any(e.param.dtype != torch.float32 for e in self.entries)
        self.master = self._gather_values() if needs_master else None
        linears = _linear_weights(model) if fast_linear else {}
        for entry in self.entries:
            if entry.name in linears:
                self._patch_linear(linears[entry.name], entry)
            else:
                entry.param.requires_grad_(True)
                self._handles.append(entry.param.register_post_accumulate_grad_hook(self._gatherer(entry)))

    # -- gradients arrive ------------------------------------------------------------------------
    def _gatherer(self, entry: _Entry) -> Callable[[Tensor], None]:
        """Hook: add the selected entries of a freshly accumulated gradient to the buffer, free the rest."""
        buffer = self.grad[entry.start : entry.stop]

        def gather(tensor: Tensor) -> None:
            grad = tensor.grad.reshape(-1)
            buffer.add_(grad if entry.anchor is not None else grad.index_select(0, entry.index))
            tensor.grad = None

        return gather

    def _patch_linear(self, module: nn.Linear, entry: _Entry) -> None:
        weight = module.weight
        rows, cols = entry.index // weight.shape[1], entry.index % weight.shape[1]
        crow = torch.zeros(weight.shape[0] + 1, dtype=torch.long, device=weight.device)
        crow[1:] = torch.bincount(rows, minlength=weight.shape[0]).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), device=weight.device),
                                              tuple(weight.shape), check_invariants=True)
        entry.anchor = torch.zeros(entry.stop - entry.start, device=weight.device, requires_grad=True)
        anchor = entry.anchor
        weight.requires_grad_(False)

        def forward(self_: nn.Linear, x: Tensor) -> Tensor:
            return _SelectedLinear.apply(x, self_.weight, self_.bias, anchor, pattern)

        module.forward = types.MethodType(forward, module)
        self._patched.append(module)
        self._handles.append(anchor.register_post_accumulate_grad_hook(self._gatherer(entry)))

    # -- engine API --------------------------------------------------------------------------------
    def _dense_grads(self) -> list[Tensor]:
        if self.dense is None:
            return []
        return [p.grad for group in self.dense.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the gathered (and dense) gradients so their joint L2 norm is at most `max_norm`."""
        dense = self._dense_grads()
        norms = [self.grad.norm()] + [g.detach().float().norm().to(self.grad.device) for g in dense]
        total = torch.stack(norms).norm()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        self.grad.mul_(scale)
        for g in dense:
            g.mul_(scale.to(g.device, g.dtype))
        return total

    @torch.no_grad()
    def step(self) -> None:
        s = self.settings
        self.steps += 1
        values = self.master if self.master is not None else self._gather_values()
        grad = self.grad
        if s.weight_decay and s.decoupled:
            values.mul_(1 - s.lr * s.weight_decay)
        elif s.weight_decay:
            grad = grad.add(values, alpha=s.weight_decay)
        beta1, beta2 = s.betas
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - beta2**self.steps)).add_(s.eps)
        values.addcdiv_(self.exp_avg, denom, value=-s.lr / (1 - beta1**self.steps))
        for entry in self.entries:
            flat = entry.param.detach().view(-1)
            flat.index_copy_(0, entry.index, values[entry.start : entry.stop].to(flat.dtype))
        if self.dense is not None:
            self.dense.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grad.zero_()
        if self.dense is not None:
            self.dense.zero_grad(set_to_none=set_to_none)

    def _gather_values(self) -> Tensor:
        if not self.entries:
            return torch.zeros(0)
        return torch.cat([e.param.detach().reshape(-1).index_select(0, e.index).float() for e in self.entries])

    # -- bookkeeping -------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """Every tensor this optimiser keeps for the selected entries (each holds k values)."""
        state = {"grad": self.grad, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.master is not None:
            state["master"] = self.master
        state.update({f"anchor:{e.name}": e.anchor for e in self.entries if e.anchor is not None})
        return state

    def state_dict(self) -> dict:
        """The moments and step count (the gradient buffer is empty between steps; fp32 weights are the values)."""
        state = {"steps": self.steps, "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}
        if self.master is not None:
            state["master"] = self.master.clone()
        if self.dense is not None:
            state["dense"] = self.dense.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        if self.master is not None:
            self.master.copy_(state["master"])
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])

    def close(self) -> None:
        """Remove hooks and restore patched modules; weights keep the values trained so far."""
        for handle in self._handles:
            handle.remove()
        for module in self._patched:
            del module.forward  # back to nn.Linear.forward
            module.weight.requires_grad_(True)
        self._handles, self._patched = [], []


def _linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    """Parameter name -> module for weights of plain `nn.Linear` modules (the fast path's candidates)."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            found[f"{module_name}.weight" if module_name else "weight"] = module
    return found
