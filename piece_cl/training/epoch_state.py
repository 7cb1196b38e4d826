"""Within-stage resume: the state of a stage's training at the end of each epoch.

A stage restarts from the previous stage's checkpoint with the same seed, so the method's `before_task`
rebuilds masks, teacher and new adapters exactly as the first attempt did; only then does the engine load
this state — the method's `state_dict`, the weights the fit trains, the optimiser state, the RNG states,
the losses and the step counter — and skip the epochs already done. Written atomically after every epoch
(the last one without optimiser state: a kill during evaluation then skips training altogether).

Cost per epoch: one copy of the trained weights, the optimiser state (Adam: 2x the trained weights;
PIECE: a few numbers per selected entry) and the method's state (EWC: 2x the trained weights).
`trainer.epoch_checkpoints=false` turns it off.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from piece_cl.checkpoint import atomic_directory, reading
from piece_cl.io import writing


@dataclass
class EpochState:
    epochs_done: int
    losses: list[float]
    global_step: int


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_epoch_state(directory: Path, state: EpochState, method, params: list[tuple[str, torch.nn.Parameter]],
                     optimizer, finished: bool) -> None:
    with atomic_directory(directory) as tmp:
        with writing(directory / "weights.safetensors"):
            save_file({name: p.detach().contiguous() for name, p in params}, str(tmp / "weights.safetensors"))
        with writing(directory / "method.pt"), open(tmp / "method.pt", "wb") as handle:
            torch.save(method.state_dict(), handle)  # what changes while training (EWC's online Fisher)
        with writing(directory / "rng.pt"), open(tmp / "rng.pt", "wb") as handle:
            torch.save(_rng_states(), handle)
        if not finished:
            with writing(directory / "optimizer.pt"), open(tmp / "optimizer.pt", "wb") as handle:
                torch.save(optimizer.state_dict(), handle)
        (tmp / "progress.json").write_text(json.dumps(vars(state)))


def load_epoch_state(directory: Path, method, params: list[tuple[str, torch.nn.Parameter]],
                     optimizer) -> EpochState | None:
    """Restore the method's state, the weights, RNG states and (mid-stage) optimiser state saved after the
    last finished epoch."""
    if not (directory / "progress.json").exists():
        return None
    advice = (f"delete {directory} and rerun the same command: the stage restarts from its beginning "
              "(the committed stages are kept)")
    with reading(directory / "progress.json", advice):
        state = EpochState(**json.loads((directory / "progress.json").read_text()))
    with reading(directory / "method.pt", advice):
        method.load_state_dict(torch.load(directory / "method.pt", weights_only=False))
    with reading(directory / "weights.safetensors", advice):
        weights = load_file(str(directory / "weights.safetensors"))
        with torch.no_grad():
            for name, param in params:
                param.copy_(weights[name])
    if (directory / "optimizer.pt").exists():
        with reading(directory / "optimizer.pt", advice):
            optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))
    with reading(directory / "rng.pt", advice):
        _set_rng_states(torch.load(directory / "rng.pt", weights_only=False))
    return state
