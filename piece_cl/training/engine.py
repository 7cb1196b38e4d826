"""The training engine: the contract methods see (`Engine`), and its plain-torch backend.

The engine owns batching, accumulation, clipping and the optimiser step; methods hook in through the
contract in methods/base.py and touch the engine only through the members `Engine` declares. Gradients a
method sees (`get_grad`, `hook_grad`) are true one-process gradients: how a backend scales losses before
reducing them (DeepSpeed's ranks) stays inside the backend. The DeepSpeed backend (deepspeed_engine.py)
subclasses `TorchEngine`; training/build.py picks one, so neither backend imports the other.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from piece_cl.data.collate import collate, encode_all
from piece_cl.data.multimodal import MultimodalCollator, is_multimodal
from piece_cl.errors import PieceError
from piece_cl.faults import maybe_kill
from piece_cl.progress import progress
from piece_cl.training.epoch_state import EpochState, load_epoch_state, save_epoch_state


GradFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@runtime_checkable
class Engine(Protocol):
    """Everything a method may use of the engine (tests/test_engine_contract.py greps methods/ for it)."""

    micro_batch_size: int
    world_size: int
    is_main: bool  # one rank writes a stage's files (masks)
    global_step: int  # optimiser steps so far in the run (read only: tracked scalars are keyed by it)

    def encode(self, records: list[dict]) -> list[dict]:
        """Records tokenised exactly as training sees them."""

    def batch(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Features collated and moved to the training device."""

    def get_grad(self, name: str, param: nn.Parameter) -> torch.Tensor | None:
        """The reduced gradient of `param` for this step (inside `after_backward`)."""

    def set_grad(self, name: str, param: nn.Parameter, value: torch.Tensor) -> None:
        """Replace the reduced gradient of `param` for this step (inside `after_backward`)."""

    def hook_grad(self, param: nn.Parameter, fn: GradFn):
        """Call `fn(grad)` on each micro-batch gradient of `param` as backward forms it, before any reduction;
        a tensor `fn` returns replaces that gradient. Returns a handle with `.remove()`."""

    def average_across_ranks(self, tensor: torch.Tensor) -> None:
        """In place: the mean of `tensor` over the ranks (one process: itself)."""


def check_finite(loss: torch.Tensor, ctx, step: int) -> None:
    """A non-finite loss stops the stage (earlier stages stay committed)."""
    if not torch.isfinite(loss):
        raise PieceError(f"non-finite loss ({float(loss.detach())}) in task '{ctx.task.name}' at step {step}; "
                         "stage stopped, earlier stages are kept (lower the learning rate?)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchEngine:
    """Single-process training with gradient accumulation to the configured global batch."""

    world_size = 1
    rank = 0
    is_main = True

    def __init__(self, trainer_cfg, model: nn.Module, tokenizer):
        self.cfg = trainer_cfg
        self.device = resolve_device(trainer_cfg.device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.batch_size = int(trainer_cfg.batch_size)
        self.micro_batch_size = min(int(trainer_cfg.micro_batch_size), self.batch_size)
        self.global_step = 0
        self._open: _OpenFit | None = None  # the fit in progress (its optimiser serves fits nested in its events)
        self.step_stats: dict = {}  # the last optimiser step, for tracking (piece_cl/tracking); never read back
        self.grad_norm = None
        # multimodal models get a processor: images and prompts go through it (data/multimodal.py)
        self.multimodal_collator = MultimodalCollator(tokenizer, int(trainer_cfg.max_answer_len)) \
            if is_multimodal(tokenizer) else None

    # -- gradients, engine-agnostic -------------------------------------------------------------
    # What a gradient formed during this process's backward is, relative to the one-process gradient of the
    # same micro-batch (DeepSpeed's ranks scale their losses by the world size before it averages them).
    # Private: `hook_grad` hands methods the true gradient.
    _grad_scale = 1.0

    def average_across_ranks(self, tensor: torch.Tensor) -> None:
        """In place: the mean of `tensor` over the ranks (one process: itself)."""

    def barrier(self) -> None:
        """Every rank waits here for the others (one process: nothing to wait for)."""

    def get_grad(self, name: str, param: nn.Parameter) -> torch.Tensor | None:
        return param.grad

    def set_grad(self, name: str, param: nn.Parameter, value: torch.Tensor) -> None:
        param.grad = value.to(param.dtype).reshape(param.shape)

    def hook_grad(self, param: nn.Parameter, fn: GradFn):
        def hook(grad: torch.Tensor):
            scale = self._grad_scale  # read per call: it depends on the fit (wrapped or not)
            if scale == 1.0:
                return fn(grad)
            out = fn(grad / scale)
            return None if out is None else out * scale
        return param.register_hook(hook)

    # -- data -----------------------------------------------------------------------------------
    def encode(self, records: list[dict]) -> list[dict]:
        if self.multimodal_collator is not None:
            return self.multimodal_collator.encode(records)
        return encode_all(self.tokenizer, records, int(self.cfg.max_prompt_len), int(self.cfg.max_answer_len))

    def batch(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.multimodal_collator is not None:
            batch = self.multimodal_collator(features)
        else:
            batch = collate(features, self.tokenizer.pad_token_id, side="right")
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def mean_loss(self, records: list[dict]) -> float:
        """Token-mean answer loss over `records` (held-out loss curves), model left in its mode."""
        was_training = self.model.training
        self.model.eval()
        features = self.encode(records)
        total, tokens = 0.0, 0
        for start in range(0, len(features), self.micro_batch_size):
            batch = self.batch(features[start : start + self.micro_batch_size])
            out = self.model(**batch)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(out.loss) * n
            tokens += n
        self.model.train(was_training)
        return total / max(tokens, 1)

    # -- training -------------------------------------------------------------------------------
    def fit(self, ctx, method, records: list[dict], epochs: int, optimizer_factory,
            on_step: Callable[[int], None] | None = None, description: str = "train",
            epoch_dir: Path | None = None) -> dict:
        """Train `records` for `epochs` epochs; returns loss statistics of the stage.

        After each epoch the method's `after_epoch(ctx, epoch)` runs; a fit it starts (Replay's `ctx.fit`)
        trains with this fit's optimiser, as one process trained by the authors' scripts did (`_fit_within`).
        With `epoch_dir` the state after every epoch (its event included) is kept there
        (training/epoch_state.py), and a fit that finds one continues after its last finished epoch.
        """
        if not records:
            raise PieceError(f"task '{ctx.task.name}': nothing to train on")
        if self._open is not None:
            return self._fit_within(ctx, method, records, epochs, on_step)
        features = self.encode(records)
        params = method.trainable(self.model)
        optimizer = method.build_optimizer(ctx, params, optimizer_factory)
        self.prepare(optimizer)
        steps_per_epoch = math.ceil(len(features) / self.batch_size)
        generator = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.t)
        done = load_epoch_state(epoch_dir, method, params, optimizer) if epoch_dir is not None else None
        losses: list[float] = list(done.losses) if done else []
        if done:
            self.global_step = done.global_step
            ctx.log(f"task '{ctx.task.name}': continuing after epoch {done.epochs_done}/{epochs}")
        self.model.train()
        self._open = _OpenFit(optimizer, params)
        try:
            return self._epochs(ctx, method, features, epochs, optimizer, params, generator, done, losses,
                                steps_per_epoch, on_step, description, epoch_dir)
        finally:
            self._open = None

    def _epochs(self, ctx, method, features, epochs, optimizer, params, generator, done, losses, steps_per_epoch,
                on_step, description, epoch_dir) -> dict:
        with progress() as bar:
            job = bar.add_task(f"{description} {ctx.task.name}", total=epochs * steps_per_epoch,
                               completed=len(losses), info="")
            for epoch in range(epochs):
                # drawn for every epoch, done or not, so the order of the next one is the uninterrupted run's
                order = torch.randperm(len(features), generator=generator).tolist() if self.cfg.shuffle else list(range(len(features)))
                if done and epoch < done.epochs_done:
                    continue
                for step in range(steps_per_epoch):
                    chunk = [features[i] for i in order[step * self.batch_size : (step + 1) * self.batch_size]]
                    started = time.perf_counter()
                    loss = self._step(ctx, method, optimizer, params, chunk)
                    self.step_stats = {"loss": loss, "lr": learning_rate(optimizer), "grad_norm": self.grad_norm,
                                       "samples_per_s": len(chunk) / max(time.perf_counter() - started, 1e-9),
                                       "epoch": epoch + 1}
                    losses.append(loss)
                    self.global_step += 1
                    bar.update(job, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {loss:.3f}")
                    if on_step is not None:
                        on_step(self.global_step)
                self._open.epoch = epoch
                method.after_epoch(ctx, epoch)
                if epoch_dir is not None:
                    if self.is_main:
                        save_epoch_state(epoch_dir, EpochState(epoch + 1, losses, self.global_step), method, params,
                                         optimizer, finished=epoch + 1 == epochs)
                    self.barrier()  # no rank goes on (or is killed) before the epoch state is complete
                    maybe_kill("epoch", ctx.t)
        return {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                "mean_last_epoch_loss": sum(losses[-steps_per_epoch:]) / steps_per_epoch}

    def _fit_within(self, ctx, method, records: list[dict], epochs: int, on_step=None) -> dict:
        """`records` trained inside the open fit (from its `after_epoch`): its optimiser, its trainable set.

        The order is drawn from (seed, task, epoch), never from the open fit's generator, so a fit resumed
        after epoch e draws the same orders as the uninterrupted one.
        """
        features, open_fit = self.encode(records), self._open
        generator = torch.Generator().manual_seed((ctx.seed * 1000 + ctx.t) * 1000 + open_fit.epoch + 1)
        steps_per_epoch = math.ceil(len(features) / self.batch_size)
        losses: list[float] = []
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=generator).tolist() if self.cfg.shuffle else list(range(len(features)))
            for step in range(steps_per_epoch):
                chunk = [features[i] for i in order[step * self.batch_size : (step + 1) * self.batch_size]]
                started = time.perf_counter()
                losses.append(self._step(ctx, method, open_fit.optimizer, open_fit.params, chunk))
                self.step_stats = {"loss": losses[-1], "lr": learning_rate(open_fit.optimizer), "grad_norm": self.grad_norm,
                                   "samples_per_s": len(chunk) / max(time.perf_counter() - started, 1e-9),
                                   "epoch": open_fit.epoch + 1}
                self.global_step += 1
                if on_step is not None:
                    on_step(self.global_step)
        return {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                "mean_last_epoch_loss": sum(losses[-steps_per_epoch:]) / steps_per_epoch}

    def prepare(self, optimizer) -> None:
        """Called once per fit with the method's fresh optimiser (DeepSpeed wraps the model here)."""

    def _step(self, ctx, method, optimizer, params, chunk: list[dict]) -> float:
        total = 0.0
        for start in range(0, len(chunk), self.micro_batch_size):
            micro = chunk[start : start + self.micro_batch_size]
            batch = self.batch(micro)
            out = self.model(**batch)
            loss = method.loss(ctx, batch, out)
            check_finite(loss, ctx, self.global_step)
            (loss * (len(micro) / len(chunk))).backward()
            total += float(loss.detach()) * len(micro) / len(chunk)
        self._step_tail(ctx, method, optimizer, params)
        return total

    def _step_tail(self, ctx, method, optimizer, params) -> None:
        """Gradients reduced: the method's surgery, clipping to trainer.grad_clip, the step (both backends)."""
        method.after_backward(ctx)
        self.grad_norm = clip_gradients(optimizer, params, float(self.cfg.grad_clip or 0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def clip_gradients(optimizer, params, clip: float) -> torch.Tensor:
    """Clip to `clip` (0: no clipping) and return the norm before clipping (tracked as train/grad_norm).

    Without clipping the threshold is infinite: the scale is exactly 1, so the gradients are unchanged.
    """
    limit = clip if clip > 0 else math.inf
    if hasattr(optimizer, "clip_grad_norm_"):
        return optimizer.clip_grad_norm_(limit)  # optimisers that keep their own (sparse) gradients
    grads = [p for _, p in params if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(grads, limit) if grads else torch.zeros(())


def learning_rate(optimizer) -> float | None:
    """The optimiser's current learning rate (first parameter group; PIECE's sparse Adam: its setting)."""
    groups = getattr(optimizer, "param_groups", None)
    if groups:
        return float(groups[0]["lr"])
    settings = getattr(optimizer, "settings", None)
    return float(settings.lr) if settings is not None else None


class _OpenFit:
    """The optimiser and trainable set of the fit in progress, and the epoch whose event is running."""

    def __init__(self, optimizer, params):
        self.optimizer, self.params, self.epoch = optimizer, params, -1
