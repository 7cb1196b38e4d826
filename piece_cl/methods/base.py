"""The method contract and its registry (mammoth/avalanche style: one small file per method).

A method only sees hooks of the loop; it never knows whether a plain-torch or a DeepSpeed engine
runs it, and uses only what `training.engine.Engine` declares: gradient edits go through
`ctx.engine.get_grad/set_grad`, masks and per-micro-batch observers through `ctx.engine.hook_grad`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from piece_cl.errors import PieceError
from piece_cl.scope import out_of_scope

if TYPE_CHECKING:
    from piece_cl.training.engine import Engine

# Every method the paper compares, mapped to the module that implements it. A module that is missing
# or broken is reported only when its method is chosen.
METHOD_MODULES: dict[str, str] = {
    name: f"piece_cl.methods.{name}"
    for name in (
        "seqft", "ewc", "gem", "lwf", "replay", "replay_online",
        "seqlora", "olora", "layernorm", "migu", "piece_f", "piece_s",
    )
}
_REGISTRY: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    _REGISTRY[cls.name] = cls
    return cls


def implemented_methods() -> list[str]:
    """Names whose module imports and registers a method (imports each module once)."""
    for name, module in METHOD_MODULES.items():
        if name not in _REGISTRY:
            try:
                importlib.import_module(module)
            except ImportError:
                continue
    return sorted(_REGISTRY)


def build_method(method_cfg) -> "Method":
    name = method_cfg.name
    if name not in METHOD_MODULES:
        raise PieceError(f"unknown method '{name}'; known: {', '.join(METHOD_MODULES)}")
    if name not in _REGISTRY:
        try:
            importlib.import_module(METHOD_MODULES[name])
        except ModuleNotFoundError as err:
            if err.name != METHOD_MODULES[name]:
                raise
            raise PieceError(
                f"method '{name}' is not implemented yet; implemented: {', '.join(implemented_methods())}"
            ) from None
    return _REGISTRY[name](method_cfg)


@dataclass
class StageContext:
    """Everything a method may look at during one stage (task) of the sequence."""

    t: int
    task: Any  # benchmarks.registry.Task
    tasks_seen: list
    model: nn.Module
    tokenizer: Any
    engine: "Engine"
    cfg: Any  # the whole run config
    stage_dir: Path
    seed: int
    fit: Callable[..., dict] = field(repr=False, default=None)  # fit(records, epochs=None): train with the engine
    log: Callable[[str], None] = print


class Method:
    """Default behaviour = sequential fine-tuning of every parameter in scope (piece_cl/scope.py)."""

    name: ClassVar[str] = "base"
    # Why the method cannot run under ZeRO-3 (None: it can). ZeRO-3 holds only a shard of each parameter
    # outside the forward pass, so a method reading whole weights or running its own backward passes fails.
    zero3_blocker: ClassVar[str | None] = None
    # True when the method's optimiser is not a torch optimiser that ZeRO partitions (PIECE's O(k) one): its
    # state is replicated on every rank, so ZeRO offloads do nothing and epoch checkpoints work as in one process.
    optimizer_outside_zero: ClassVar[bool] = False

    def __init__(self, cfg):
        self.cfg = cfg

    def check_trainer(self, trainer_cfg) -> None:
        """Refuse engine settings the method cannot honour, in the parent, before anything loads."""
        if trainer_cfg.engine != "deepspeed":
            return
        if int(trainer_cfg.zero_stage) == 3 and self.zero3_blocker:
            raise PieceError(f"method={self.name} cannot run under trainer.zero_stage=3: {self.zero3_blocker}; "
                             "use trainer.zero_stage=2 (the paper's setting)")
        if self.optimizer_outside_zero:
            for key in ("offload_optimizer", "offload_param"):
                if trainer_cfg.get(key):
                    raise PieceError(f"method={self.name} keeps its own O(k) optimiser state outside ZeRO, so trainer."
                                     f"{key}=true would be ignored; drop it (that state is a few numbers per selected entry)")
        elif trainer_cfg.get("epoch_checkpoints"):
            raise PieceError(f"trainer.epoch_checkpoints=true under trainer=deepspeed needs an optimiser outside ZeRO "
                             f"(PIECE-F/S); method={self.name}'s is partitioned, so its stages restart when killed")

    # -- once ---------------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> nn.Module:
        """Freeze what is out of scope (piece_cl/scope.py: embeddings, a vision tower and its projector unless
        the method's config takes them back); wrap the model if the method needs to."""
        for name, param in model.named_parameters():
            if out_of_scope(name, self.cfg):
                param.requires_grad_(False)
        return model

    # -- per task -----------------------------------------------------------------------------
    def before_task(self, ctx: StageContext) -> None:
        """Importance and masks (PIECE, MIGU), teacher snapshot (LwF), new adapter (O-LoRA)."""

    def train_records(self, ctx: StageContext) -> list[dict]:
        """The records trained on in this stage (Replay-online mixes past samples in here)."""
        return ctx.task.train

    def trainable(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """What the optimiser sees."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def build_optimizer(self, ctx: StageContext, params: list[tuple[str, nn.Parameter]], optimizer_factory):
        """`optimizer_factory(iterable of params)` is the configured optimiser with its lr, betas, ..."""
        return optimizer_factory([p for _, p in params])

    def loss(self, ctx: StageContext, batch: dict[str, torch.Tensor], out) -> torch.Tensor:
        """Answer-token cross-entropy; penalties (EWC, LwF, O-LoRA) add to it."""
        return out.loss

    def after_backward(self, ctx: StageContext) -> None:
        """Gradient surgery (GEM) through `ctx.engine.get_grad/set_grad`."""

    def after_epoch(self, ctx: StageContext, epoch: int) -> None:
        """After each epoch of a fit (0-based `epoch`): Replay's pass over its buffer (protocol=official_code).
        A `ctx.fit` here trains with the running fit's optimiser."""

    def after_task(self, ctx: StageContext) -> None:
        """Fisher (EWC), memories (GEM, Replay), adapter bookkeeping (O-LoRA)."""

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model evaluated after a stage."""
        return model

    # -- tracking (piece_cl/tracking): read after each step / stage, never by training ---------
    def step_scalars(self) -> dict[str, float]:
        """Values of the last optimiser step worth plotting (EWC penalty, LwF KD term, GEM projections)."""
        return {}

    def stage_scalars(self) -> dict[str, float]:
        """Values of this stage worth plotting (PIECE's importance statistics)."""
        return {}

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StepMeans:
    """Per-step means of terms a method computes in its loss, for `step_scalars` (no GPU sync until read)."""

    def __init__(self):
        self.step, self.sums, self.counts = None, {}, {}

    def add(self, step: int, name: str, value: torch.Tensor) -> None:
        if step != self.step:  # micro-batches of one optimiser step share the engine's step counter
            self.step, self.sums, self.counts = step, {}, {}
        self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: float(total) / self.counts[name] for name, total in self.sums.items()}
