"""The tracker run.py calls: names what a step, a stage and the end of a run log, and keeps a failing
backend from ever stopping a run (one warning, then the run goes on without that backend).

Names group by their prefix in both UIs: train/* every optimiser step, heldout_loss/<task> (Figures
17-19), method/* (EWC penalty, LwF KD term, GEM projections), R/<task> and stage/* per stage,
importance/* (PIECE's mask), figures/* and final/* at the end. Every value sits at the global step
across the whole sequence, so stage boundaries line up in every chart.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from rich.markup import escape

from piece_cl.progress import console
from piece_cl.schema import flatten_config
from piece_cl.tracking.backends import TensorBoardBackend, TrackingUnavailable, WandbBackend

# Config keys that are not hyper-parameters of the experiment (where it ran, how it was logged).
NOT_HPARAMS = ("logger", "paths", "run_dir", "world_size", "distributed", "versions", "overrides", "resume",
               "verbose")


def hparams_of(cfg) -> dict:
    """The resolved config flattened to the scalar types both HParams views take (lists as text)."""
    resolved = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    params = {}
    for key, value in flatten_config({k: v for k, v in resolved.items() if k not in NOT_HPARAMS}).items():
        params[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return params


class Tracker:
    """Fans each event out to the backends; with none (logger=none, or not rank 0) every call is a no-op."""

    def __init__(self, backends: list | None = None):
        self.backends = list(backends or [])
        self.started = False

    @property
    def active(self) -> bool:
        return bool(self.backends)

    def _each(self, action: str, call) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as err:  # noqa: BLE001 (tracking must never end a long run)
                self.backends.remove(backend)
                warn(f"{backend.name} failed while {action} ({type(err).__name__}: {err}); "
                     "the run goes on without it")

    def _write(self, action: str, step: int, first_kept: int, call) -> None:
        """The first write of this process fixes the restart point: events of an interrupted attempt at
        or after `first_kept` are superseded (a step event redoes its step; a stage event with no step
        before it in this process follows the kept steps)."""
        if not self.started:
            self.started = True
            self._each("starting", lambda b: b.start(first_kept))
        self._each(action, call)
        self._each("flushing", lambda b: b.flush())

    # -- events -------------------------------------------------------------------------------
    def on_step(self, step: int, stage: int, stats: dict, method_scalars: dict | None = None,
                heldout: dict | None = None) -> None:
        """One optimiser step: stats from the engine (loss, lr, grad_norm, samples_per_s, epoch)."""
        if not self.backends:
            return
        values = {f"train/{name}": float(value) for name, value in stats.items() if value is not None}
        values["train/task"] = float(stage)
        values.update({f"method/{name}": float(value) for name, value in (method_scalars or {}).items()})
        values.update({f"heldout_loss/{task}": float(loss) for task, loss in (heldout or {}).items()})
        self._write("logging a step", step, step, lambda b: b.scalars(values, step))

    def on_stage(self, t: int, step: int, results, method_scalars: dict | None = None) -> None:
        """Stage t committed in `results`: its R row, OP/BWT/AP, the probe, the method's stage values."""
        if not self.backends:
            return
        summary = results.to_dict()
        values = {f"R/{task}": float(score) for task, score in zip(results.tasks, results.R[t])}
        values.update({"stage/OP": summary["OP"][t], "stage/BWT": summary["BWT"][t], "stage/AP": summary["AP"][t],
                       "stage/tasks_learned": float(t + 1)})
        if t < len(results.probe_after):
            values["stage/probe"] = results.probe_after[t]
        if t == 0 and results.probe_base is not None:
            values["stage/probe_base"] = results.probe_base
        values.update({f"importance/{name}": float(value) for name, value in (method_scalars or {}).items()})
        values = {tag: float(value) for tag, value in values.items()}
        self._write("logging a stage", step, step + 1, lambda b: b.scalars(values, step))

    def on_end(self, results, cfg, step: int) -> None:
        """The R-matrix heatmap and Figure 1 as images; the config as hyper-parameters with final metrics."""
        if not self.backends:
            return
        summary = results.to_dict()
        metrics = {"final/OP": summary["OP"][-1], "final/BWT": summary["BWT"][-1], "final/AP": summary["AP"][-1]}
        if results.probe_after:
            metrics["final/probe"] = results.probe_after[-1]
        with tempfile.TemporaryDirectory(prefix="piece_tracking_") as tmp:
            try:
                images = _figures(results, Path(tmp))
            except Exception as err:  # noqa: BLE001 (a figure that fails to draw is not worth the run)
                warn(f"figures for tracking not drawn ({type(err).__name__}: {err})")
                images = {}
            for tag, png in images.items():
                self._write("logging an image", step, step + 1, lambda b, tag=tag, png=png: b.image(tag, png, step))
        self._write("logging hyper-parameters", step, step + 1,
                    lambda b: b.hparams(hparams_of(cfg), metrics, step))

    def close(self) -> None:
        self._each("closing", lambda b: b.close())
        self.backends = []


def _figures(results, out_dir: Path) -> dict[str, Path]:
    from piece_cl.report import figures

    summary = results.to_dict()
    stages = list(range(1, len(results.R) + 1))
    images = {"figures/R_matrix": figures.r_matrix(results.R, results.tasks, f"R matrix — {results.run}",
                                                   out_dir, "r_matrix")}
    probe = [figures.Curve(results.method, stages[: len(results.probe_after)], results.probe_after)] \
        if results.probe_after else []
    images["figures/figure1_op_probe"] = figures.op_and_probe(
        [figures.Curve(results.method, stages, summary["OP"])], probe, results.probe_name or "probe",
        f"OP and probe — {results.run}", out_dir, "figure1")
    return images


def warn(message: str) -> None:
    console.print(f"[yellow]WARNING[/] tracking: {escape(message)}")


def build_tracker(cfg, run_dir: Path, is_main: bool) -> Tracker:
    """The backends `cfg.logger` names (logger=[tensorboard,wandb] selects both); rank 0 only."""
    settings = cfg.get("logger") or {}
    if not is_main or not settings:
        return Tracker()
    backends = []
    for name in settings:
        try:
            if name == "tensorboard":
                backends.append(TensorBoardBackend(run_dir, settings[name]))
            elif name == "wandb":
                backends.append(WandbBackend(run_dir, settings[name], hparams_of(cfg)))
            else:
                warn(f"unknown logger '{name}' ignored; known: tensorboard, wandb")
        except TrackingUnavailable as err:
            warn(f"{name} not started: {err}")
        except Exception as err:  # noqa: BLE001 (e.g. W&B cannot reach its server)
            warn(f"{name} not started ({type(err).__name__}: {err}); the run goes on without it")
    return Tracker(backends)
