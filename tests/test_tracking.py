"""Experiment tracking (docs/tracking.md): event files read back with TensorBoard's own reader, W&B's
offline files (or a fake module behind the same adapter), and the rules: logging never changes results,
a resumed run has every step once, a failing logger is one warning."""
import glob
import json
import signal
import struct
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from piece_cl.tracking import Tracker, build_tracker
from piece_cl.tracking.backends import TensorBoardBackend, WandbBackend
from piece_cl.tracking.stats import importance_statistics
from piece_cl.tracking.tracker import hparams_of
from tests.conftest import run_embedded

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(log_dir: Path):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps(acc, tag: str) -> list[int]:
    return [event.step for event in acc.Scalars(tag)]


# -- fast: backends and the tracker without a model -------------------------------------------------
def test_a_restarted_writer_supersedes_the_steps_it_redoes(tmp_path):
    first = TensorBoardBackend(tmp_path, {"dir": "tb"})
    first.start(1)
    for step in range(1, 6):
        first.scalars({"train/loss": float(step)}, step)
        first.flush()
    first.writer.flush()  # killed here: steps 1-5 on disk, 4 and 5 to be redone
    again = TensorBoardBackend(tmp_path, {"dir": "tb"})
    again.start(4)
    for step in range(4, 8):
        again.scalars({"train/loss": 10.0 + step}, step)
    again.close()
    acc = read_events(tmp_path / "tb")
    assert steps(acc, "train/loss") == [1, 2, 3, 4, 5, 6, 7]
    assert [e.value for e in acc.Scalars("train/loss")][3:] == [14.0, 15.0, 16.0, 17.0]


class Exploding:
    name = "exploding"

    def __init__(self):
        self.calls = 0

    def start(self, purge_step):
        pass

    def scalars(self, values, step):
        self.calls += 1
        raise OSError("disk on fire")

    def flush(self):
        pass

    def close(self):
        pass


def test_a_failing_backend_is_one_warning_and_the_others_go_on(tmp_path, capsys):
    from piece_cl.progress import console

    exploding, good = Exploding(), TensorBoardBackend(tmp_path, {"dir": "tb"})
    tracker = Tracker([exploding, good])
    with console.capture() as captured:
        for step in (1, 2, 3):
            tracker.on_step(step, 0, {"loss": 1.0, "grad_norm": torch.tensor(2.0), "lr": None})
    tracker.close()
    text = " ".join(captured.get().split())
    assert text.count("WARNING") == 1 and "exploding failed" in text and "disk on fire" in text
    assert exploding.calls == 1
    acc = read_events(tmp_path / "tb")
    assert steps(acc, "train/loss") == [1, 2, 3] and steps(acc, "train/grad_norm") == [1, 2, 3]
    assert "train/lr" not in acc.Tags()["scalars"]  # a value the optimiser has not got is left out


def test_wandb_missing_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    from piece_cl.progress import console

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = OmegaConf.create({"logger": {"tensorboard": {"dir": "tb"}, "wandb": {"project": "p", "mode": "offline"}}})
    with console.capture() as captured:
        tracker = build_tracker(cfg, tmp_path, is_main=True)
    assert [b.name for b in tracker.backends] == ["tensorboard"]
    assert "pip install 'piece-cl[wandb]'" in " ".join(captured.get().split())


def test_only_rank_0_logs_and_logger_none_builds_nothing(tmp_path):
    cfg = OmegaConf.create({"logger": {"tensorboard": {"dir": "tb"}}})
    assert not build_tracker(cfg, tmp_path, is_main=False).active
    assert not build_tracker(OmegaConf.create({"logger": {}}), tmp_path, is_main=True).active
    assert not (tmp_path / "tb").exists()


def fake_wandb(log: list, resumed_step: int):
    """A stand-in with the calls the adapter makes; a second init resumes at `resumed_step`."""
    module = types.ModuleType("wandb")

    class Run:
        def __init__(self, step: int):
            self.step = step
            self.config = types.SimpleNamespace(update=lambda params, allow_val_change: log.append(("config", params)))
            self.summary = types.SimpleNamespace(update=lambda metrics: log.append(("summary", metrics)))

        def log(self, values, step):
            log.append(("log", step, values))

        def finish(self):
            log.append(("finish",))

    def init(**kwargs):
        step = resumed_step if any(entry[0] == "init" for entry in log) else 0
        log.append(("init", kwargs))
        return Run(step)

    module.init, module.Image = init, lambda path: ("image", path)
    return module


def test_wandb_adapter_names_the_run_keeps_its_id_and_skips_steps_it_has(tmp_path, monkeypatch):
    """The real package's offline files are checked below when it is installed; this runs everywhere."""
    log: list = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(log, resumed_step=3))
    run_dir = tmp_path / "seqft_tiny_tiny_20261203"
    run_dir.mkdir()
    settings = {"project": "piece", "entity": "lab", "tags": ["a", "b"], "mode": "offline"}
    WandbBackend(run_dir, settings, {"seed": 42}).close()
    resumed = WandbBackend(run_dir, settings, {"seed": 42})
    inits = [entry[1] for entry in log if entry[0] == "init"]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    for init in inits:
        assert init["name"] == run_dir.name and init["resume"] == "allow" and init["mode"] == "offline"
        assert init["project"] == "piece" and init["entity"] == "lab" and init["tags"] == ["a", "b"]
        assert init["dir"] == str(run_dir) and init["config"] == {"seed": 42} and init["id"] == run_id
    for step in (2, 3, 4):  # step 2 was sent before the interruption
        resumed.scalars({"train/loss": 1.0}, step)
    resumed.hparams({"seed": 42}, {"final/OP": 5.0}, 4)
    assert [entry[1] for entry in log if entry[0] == "log"] == [3, 4]
    assert ("config", {"seed": 42}) in log and ("summary", {"final/OP": 5.0}) in log


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (W&B's LevelDB-style log: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    records = []
    for raw in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def test_real_wandb_offline_writes_the_run_and_resumes_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "piece_s_tiny_tiny_x"
    run_dir.mkdir()
    settings = {"project": "piece_cl", "entity": None, "tags": ["test"], "mode": "offline"}
    backend = WandbBackend(run_dir, settings, {"method.name": "piece_s"})
    backend.scalars({"train/loss": 2.0}, 1)
    backend.scalars({"train/loss": 1.5}, 2)
    backend.hparams({"method.name": "piece_s"}, {"final/OP": 12.5}, 2)
    backend.close()
    again = WandbBackend(run_dir, settings, {"method.name": "piece_s"})
    again.scalars({"train/loss": 1.0}, 3)
    again.close()
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = sorted(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")))
    assert files, list((run_dir / "wandb").iterdir())
    history, names = [], set()
    for path in files:
        for record in wandb_records(Path(path)):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                if "train/loss" in items:
                    history.append((record.history.step.num, items["train/loss"]))
            elif kind == "run":
                names.add((record.run.display_name, record.run.run_id, record.run.project))
    assert history == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert names == {(run_dir.name, run_id, "piece_cl")}


def test_importance_statistics_count_the_mask_and_read_quantiles():
    scores = {"a": torch.arange(100, dtype=torch.float32), "b": torch.zeros(10, 10), "c": torch.ones(5)}
    masks = {"a": torch.tensor([99, 98, 97]), "c": torch.tensor([0])}
    stats = importance_statistics(scores, masks, eligible=3)
    assert stats["k"] == 4 and stats["tensors_selected"] == 2 and stats["tensors_without"] == 1
    every = torch.cat([s.reshape(-1) for s in scores.values()])
    assert stats["score_q50"] == pytest.approx(float(torch.quantile(every, 0.5)))
    assert stats["score_q99"] == pytest.approx(float(torch.quantile(every, 0.99)))
    assert stats["score_max"] == 99.0


def test_hparams_are_the_config_without_where_it_ran():
    cfg = OmegaConf.create({"seed": 1, "method": {"name": "piece_s", "ratio": 0.001, "exclude": ["lm_head"]},
                            "paths": {"output_root": "/x"}, "logger": {"tensorboard": {"dir": "tb"}}})
    params = hparams_of(cfg)
    assert params == {"seed": 1, "method.name": "piece_s", "method.ratio": 0.001, "method.exclude": "['lm_head']"}


def test_logger_overrides_are_checked_like_other_groups():
    from piece_cl.cli import check_overrides
    from piece_cl.errors import PieceError

    check_overrides(["logger=[tensorboard,wandb]", "logger=none", "logger=[]"])
    with pytest.raises(PieceError, match="unknown logger 'tensorbord'; known: none, tensorboard, wandb"):
        check_overrides(["logger=[tensorbord]"])


# -- slow: the embedded benchmark through piece-run ------------------------------------------------
CURVES = ["trainer.loss_curve_every=1", "trainer.loss_curve_samples=4"]


def piece_run(run_dir, *extra, kill_at=None):
    return run_embedded(run_dir, *CURVES, *extra, kill_at=kill_at)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    proc = piece_run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def total_steps(run_dir: Path) -> int:
    return sum(json.loads(p.read_text())["train"]["steps"] for p in run_dir.glob("stage_*/metrics.json"))


@pytest.mark.slow
def test_event_files_hold_every_step_and_the_stage_values_of_results_json(tracked):
    acc = read_events(tracked / "tb")
    n = total_steps(tracked)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/task",
                "heldout_loss/tiny_choice", "heldout_loss/tiny_number"):
        assert steps(acc, tag) == list(range(1, n + 1)), tag
    results = json.loads((tracked / "results.json").read_text())
    stage_ends = steps(acc, "stage/OP")
    assert len(stage_ends) == 2 and stage_ends[-1] == n
    for key in ("OP", "BWT", "AP"):
        assert [e.value for e in acc.Scalars(f"stage/{key}")] == pytest.approx(results[key], abs=1e-4)
    for i, task in enumerate(results["tasks"]):
        assert [e.value for e in acc.Scalars(f"R/{task}")] == pytest.approx([row[i] for row in results["R"][i:]], abs=1e-4)
    assert [e.value for e in acc.Scalars("stage/probe")] == pytest.approx(results["probe"]["after_task"], abs=1e-4)
    assert acc.Scalars("final/OP")[-1].value == pytest.approx(results["OP"][-1], abs=1e-4)
    curve = (tracked / "stage_1_tiny_number" / "loss_curves.csv").read_text().splitlines()[1:]
    last = [row for row in curve if row.startswith(f"{n},") and ",tiny_choice," in row][0]
    assert acc.Scalars("heldout_loss/tiny_choice")[-1].value == pytest.approx(float(last.split(",")[-1]), abs=1e-5)
    assert set(acc.Tags()["images"]) == {"figures/R_matrix", "figures/figure1_op_probe"}
    assert set(acc.PluginTagToContent("hparams")) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}


@pytest.mark.slow
def test_logger_none_gives_the_same_results_bytes_and_no_event_files(tracked, tmp_path):
    proc = piece_run(tmp_path / "plain", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "plain" / "results.json").read_bytes() == (tracked / "results.json").read_bytes()
    assert not (tmp_path / "plain" / "tb").exists()


# step@1: stage 1 restarts from stage 0's checkpoint (its first step redone); eval@1: the finished epoch
# state skips training, so the first event of the resumed process is a stage value.
@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["step@1", "eval@1"])
def test_killed_and_resumed_run_logs_every_step_once(tracked, tmp_path, kill_at):
    run_dir = tmp_path / "run"
    killed = piece_run(run_dir, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL
    resumed = piece_run(run_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "results.json").read_bytes() == (tracked / "results.json").read_bytes()
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2  # one file per process
    acc, reference = read_events(run_dir / "tb"), read_events(tracked / "tb")
    n = total_steps(tracked)
    for tag in ("train/loss", "train/grad_norm", "heldout_loss/tiny_number"):
        assert steps(acc, tag) == list(range(1, n + 1)), tag
        assert [e.value for e in acc.Scalars(tag)] == [e.value for e in reference.Scalars(tag)], tag
    for tag in ("stage/OP", "R/tiny_choice", "stage/probe_base", "final/OP"):
        assert steps(acc, tag) == steps(reference, tag), tag


@pytest.mark.distributed
def test_two_ranks_write_one_event_file_with_every_step(tmp_path):
    """trainer=deepspeed on 2 gloo ranks: rank 0 alone logs, with DeepSpeed's pre-clipping gradient norm."""
    run_dir = tmp_path / "ds"
    proc = piece_run(run_dir, "trainer=deepspeed", "trainer.nproc_per_node=2", "eval.probe_before=false",
                     "benchmark.train_size=16", "model.batch_size=8", "trainer.micro_batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    acc = read_events(run_dir / "tb")
    n = total_steps(run_dir)
    for tag in ("train/loss", "train/grad_norm", "train/samples_per_s", "heldout_loss/tiny_choice"):
        assert steps(acc, tag) == list(range(1, n + 1)), tag
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))
    results = json.loads((run_dir / "results.json").read_text())
    assert [e.value for e in acc.Scalars("stage/OP")] == pytest.approx(results["OP"], abs=1e-4)
