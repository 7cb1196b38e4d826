"""Held-out loss of every task of the sequence every N optimiser steps (the paper's Figures 17-19)."""
from __future__ import annotations

from pathlib import Path

from piece_cl.io import atomic_write_text


class LossCurves:
    """Writes stage_<t>_<task>/loss_curves.csv with columns global_step, stage, task, loss."""

    def __init__(self, engine, tasks, every: int, samples: int):
        self.engine, self.tasks, self.every = engine, tasks, every
        self.held_out = {task.name: task.eval[:samples] for task in tasks}
        self.stage, self.path, self.rows = 0, None, []

    def start_stage(self, stage: int, stage_dir: Path) -> None:
        """Rows an interrupted attempt of this stage wrote are kept until its steps are trained again."""
        self.stage, self.path = stage, stage_dir / "loss_curves.csv"
        self.rows = self.path.read_text().splitlines()[1:] if self.path.exists() else []

    def on_step(self, global_step: int) -> dict[str, float] | None:
        """The held-out loss by task at this step (None between measurements), also written to the CSV."""
        if self.every <= 0 or global_step % self.every:
            return None
        self.rows = [row for row in self.rows if int(row.split(",", 1)[0]) < global_step]
        losses = {name: self.engine.mean_loss(records) for name, records in self.held_out.items() if records}
        for name, loss in losses.items():
            self.rows.append(f"{global_step},{self.stage},{name},{loss:.6f}")
        if self.engine.is_main:
            atomic_write_text(self.path, "global_step,stage,task,loss\n" + "\n".join(self.rows) + "\n")
        return losses
