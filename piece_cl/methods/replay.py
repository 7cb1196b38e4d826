"""Replay: after each task, an extra training phase on a small sample of every past task.

When task t ends, a buffer of `fraction` of each earlier task (at least `min_per_task`; `sampling:
uniform` draws with the run seed, `first` takes the file's first records as the authors' code did)
is trained on through `ctx.fit` for the configured epochs, then task t's own sample joins the buffer
for the next stages — so the buffer never holds samples of the task being learned.

The authors replayed the first 10% "after every epoch" (protocol=official_code). With `every_epoch:
true` each epoch of the current task is followed by one pass over the buffer (the `after_epoch` event;
it trains with the task's optimiser, as their one training process did), and no phase follows the task.
Replay-online instead mixes the buffer into the task's epochs, so the two train differently.

Cost: memory of the sampled records only (text); per stage, extra time ≈ fraction × (past tasks) × the
task's own training time.
"""
from __future__ import annotations

import random

from piece_cl.errors import PieceError
from piece_cl.methods.base import Method, StageContext, register_method


def sample_fraction(records: list[dict], fraction: float, sampling: str, minimum: int, seed: int) -> list[dict]:
    """round(fraction·n) records (≥ minimum): uniform without replacement with `seed`, or the first ones."""
    n = min(len(records), max(int(minimum), round(float(fraction) * len(records))))
    if sampling == "first":
        return list(records[:n])
    if sampling == "uniform":
        chosen = sorted(random.Random(seed).sample(range(len(records)), n))
        return [records[i] for i in chosen]
    raise PieceError(f"method.sampling must be 'uniform' or 'first', got {sampling!r}")


def interleave(current: list[dict], extra: list[dict]) -> list[dict]:
    """Both lists merged in order, `extra` spread evenly, so every stretch of the result holds its share."""
    keyed = [((i + 0.5) / len(current), 0, r) for i, r in enumerate(current)]
    keyed += [((j + 0.5) / len(extra), 1, r) for j, r in enumerate(extra)]
    return [r for _, _, r in sorted(keyed, key=lambda item: item[:2])]


@register_method
class Replay(Method):
    name = "replay"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.buffer: dict[str, list[dict]] = {}  # task name -> its replay sample, in the order learned

    @property
    def mixes_into_task(self) -> bool:
        """Past samples spread through the task's own records (Replay-online)."""
        return False

    @property
    def after_every_epoch(self) -> bool:
        return not self.mixes_into_task and bool(self.cfg.get("every_epoch", False))

    def replay_records(self) -> list[dict]:
        return [record for sample in self.buffer.values() for record in sample]

    def train_records(self, ctx: StageContext) -> list[dict]:
        past = self.replay_records()
        return interleave(ctx.task.train, past) if self.mixes_into_task and past else ctx.task.train

    def after_epoch(self, ctx: StageContext, epoch: int) -> None:
        past = self.replay_records()
        if past and self.after_every_epoch:
            ctx.fit(past, epochs=1)

    def after_task(self, ctx: StageContext) -> None:
        past = self.replay_records()
        if past and not self.mixes_into_task and not self.after_every_epoch:
            ctx.log(f"{self.name}: extra phase on {len(past)} samples of {len(self.buffer)} past task(s)")
            ctx.fit(past)
        self.buffer[ctx.task.name] = sample_fraction(
            ctx.task.train, self.cfg.fraction, self.cfg.sampling, self.cfg.get("min_per_task", 1), ctx.seed + ctx.t)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = dict(state.get("buffer", {}))
