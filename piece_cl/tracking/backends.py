"""The logging backends behind the tracker: TensorBoard event files and Weights & Biases.

Each backend takes scalars, images and hyper-parameters at a global step. Errors are the tracker's
business (one warning, then the backend is dropped); nothing here is retried.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from piece_cl.io import atomic_write_text


class TrackingUnavailable(Exception):
    """A backend that cannot start (package missing, bad settings): the run goes on without it."""


class TensorBoardBackend:
    """Event files under RUN_DIR/<dir>; one file per process, created at the first write.

    A resumed process writes TensorBoard's restart marker (SessionLog START at `purge_step`) before its
    first event: readers then drop whatever an interrupted attempt logged at or after that step, so the
    steps it trains again appear once.
    """

    name = "tensorboard"

    def __init__(self, run_dir: Path, settings):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # tensorboard is a dependency; a broken install still must not stop a run
            raise TrackingUnavailable(f"the tensorboard package is not importable ({err})") from err
        self._writer_class = SummaryWriter
        self.log_dir = run_dir / str(settings.get("dir", "tb"))
        self.writer = None

    def start(self, purge_step: int) -> None:
        self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=30)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        from PIL import Image

        with Image.open(png) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def hparams(self, params: dict, metrics: dict[str, float], step: int) -> None:
        """The HParams tab: this run directory is one session, its metrics the scalars below.

        Only the session summaries are written, not an experiment summary: TensorBoard then builds the
        table from every session under --logdir, so a sweep over different methods shows the union of
        their settings (an experiment summary would fix the columns to the first run's).
        """
        from torch.utils.tensorboard.summary import hparams

        _, start, end = hparams(params, metrics)
        file_writer = self.writer._get_file_writer()  # noqa: SLF001 (add_hparams would open a second run dir)
        for summary in (start, end):
            file_writer.add_summary(summary, step)
        self.scalars(metrics, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbBackend:
    """A W&B run named after the run directory; its id is kept in RUN_DIR/wandb_run_id so a resumed
    run continues the same W&B run. Steps below the resumed run's current step (ones an interrupted
    attempt already sent) are skipped: W&B steps only grow."""

    name = "wandb"
    ID_FILE = "wandb_run_id"

    def __init__(self, run_dir: Path, settings, config: dict):
        try:
            import wandb
        except ImportError as err:
            raise TrackingUnavailable("logger=wandb needs the wandb package: pip install 'piece-cl[wandb]'") from err
        self.wandb = wandb
        id_file = run_dir / self.ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            atomic_write_text(id_file, run_id + "\n")
        tags = settings.get("tags") or []
        self.run = wandb.init(project=settings.get("project"), entity=settings.get("entity"),
                              tags=[str(t) for t in tags], mode=str(settings.get("mode", "online")),
                              name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config,
                              reinit="finish_previous")
        self.floor = int(getattr(self.run, "step", 0) or 0)

    def start(self, purge_step: int) -> None:
        """W&B has no purge: the monotonic step (`floor`) keeps repeated steps out instead."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        if step >= self.floor:
            self.run.log(dict(values), step=step)

    def image(self, tag: str, png: Path, step: int) -> None:
        if step >= self.floor:
            self.run.log({tag: self.wandb.Image(str(png))}, step=step)

    def hparams(self, params: dict, metrics: dict[str, float], step: int) -> None:
        self.run.config.update(params, allow_val_change=True)
        self.run.summary.update(metrics)

    def flush(self) -> None:
        """W&B sends in the background; nothing to force."""

    def close(self) -> None:
        self.run.finish()
