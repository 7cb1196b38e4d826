"""`piece-run benchmark=trace model=tiny_llama` and `benchmark=vqa model=tiny_llava`, end to end.

Real shipped data (seven TRACE tasks: MeetingBank ships no train.json; VQA v2 questions) with 20
training samples per task, synthetic images under temporary COCO / Flickr30K roots, and held-out loss
curves every optimiser step. Each run ends with a full R matrix and a probe score per stage.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

TRACE_TASKS = ["C-STANCE", "FOMC", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten", "Py150"]
VQA_TASKS = ["action", "commonsense", "count"]
pytestmark = pytest.mark.slow  # two end-to-end runs
TRAIN, TEST, FLICKR_IMAGES = 20, 10, 4
COMMON = [f"benchmark.train_size={TRAIN}", f"benchmark.test_size={TEST}", "benchmark.eval_size=8",
          "trainer.loss_curve_every=1", "trainer.loss_curve_samples=4"]


def piece_run(tmp_path: Path, *overrides: str) -> dict:
    # one torch thread: on a loaded 2-core machine a second thread makes every small matmul ~50x slower
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PIECE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "piece_cl.cli", *COMMON, f"paths.output_root={tmp_path / 'out'}",
                           *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "out").iterdir()
    return {"dir": run_dir, "results": json.loads((run_dir / "results.json").read_text())}


def assert_complete_run(run: dict, tasks: list[str], probe_name: str, n_probe: int) -> None:
    results, run_dir = run["results"], run["dir"]
    assert results["tasks"] == tasks and results["stages_done"] == len(tasks)
    assert [len(row) for row in results["R"]] == list(range(1, len(tasks) + 1))  # full lower-triangular R
    assert all(0.0 <= value <= 100.0 for row in results["R"] for value in row)
    assert len(results["OP"]) == len(results["BWT"]) == len(tasks)
    assert results["probe"]["name"] == probe_name
    assert len(results["probe"]["after_task"]) == len(tasks) and results["probe"]["base"] is not None
    for t, name in enumerate(tasks):
        stage = run_dir / f"stage_{t}_{name}"
        predictions = [json.loads(line) for line in (stage / "predictions.jsonl").read_text().splitlines()]
        assert len(predictions) == TEST * (t + 1) + n_probe
        metrics = json.loads((stage / "metrics.json").read_text())
        assert set(tasks[: t + 1]) <= set(metrics) and metrics["probe"][probe_name] == results["probe"]["after_task"][t]
        with open(stage / "loss_curves.csv") as handle:
            rows = list(csv.DictReader(handle))
        steps = -(-TRAIN // 8)  # the tiny models' batch size is 8
        assert {r["task"] for r in rows} == set(tasks) and len(rows) == steps * len(tasks)
        assert all(int(r["stage"]) == t and float(r["loss"]) > 0 for r in rows)


def test_trace_on_tiny_llama(tmp_path, shared_data):
    run = piece_run(tmp_path, "benchmark=trace", "model=tiny_llama", f"paths.trace_root={shared_data / 'trace'}",
                    f"benchmark.tasks=[{','.join(TRACE_TASKS)}]", "benchmark.probe.n_problems=3")
    assert_complete_run(run, TRACE_TASKS, "humaneval_pass@1", n_probe=3)


def make_image_roots(tmp_path: Path, shared_data: Path) -> tuple[Path, Path]:
    """A COCO root holding every image the run will read (symlinks to three small images) and a
    Flickr30K root with the first test images and the shipped caption file."""
    coco = tmp_path / "coco"
    coco.mkdir()
    sources = []
    for color in ("red", "green", "blue"):
        Image.new("RGB", (24, 20), color).save(coco / f"_{color}.jpg")
        sources.append(coco / f"_{color}.jpg")
    names = set()
    for task in VQA_TASKS:
        folder = shared_data / "vqa_v2" / task
        names |= {Path(r["pic_path"]).name for r in json.loads((folder / "train.json").read_text())[:TRAIN]}
        names |= {Path(r["pic_path"]).name for r in json.loads((folder / "eval.json").read_text())}
        names |= {r["img_id"] + ".jpg" for r in json.loads((folder / "karpathy_test.json").read_text())[:TEST]}
    for index, name in enumerate(sorted(names)):
        (coco / name).symlink_to(sources[index % 3])
    flickr = tmp_path / "flickr30k"
    (flickr / "flickr30k-images").mkdir(parents=True)
    captions = shared_data / "flickr30k" / "flickr30k_test.json"
    (flickr / captions.name).symlink_to(captions)
    for item in json.loads(captions.read_text())[:FLICKR_IMAGES]:
        Image.new("RGB", (30, 30), "yellow").save(flickr / "flickr30k-images" / item["image_name"])
    return coco, flickr


def test_vqa_on_tiny_llava(tmp_path, shared_data):
    coco, flickr = make_image_roots(tmp_path, shared_data)
    run = piece_run(tmp_path, "benchmark=vqa", "model=tiny_llava", f"paths.vqa_root={shared_data / 'vqa_v2'}",
                    f"paths.coco_root={coco}", f"paths.flickr30k_root={flickr}",
                    f"benchmark.probe.n_problems={FLICKR_IMAGES}")
    assert_complete_run(run, VQA_TASKS, "flickr30k", n_probe=FLICKR_IMAGES)
    items = [json.loads(line) for line in (run["dir"] / "stage_0_action" / "predictions.jsonl").read_text().splitlines()]
    assert {Path(item["image"]).parent for item in items if item["task"] == "flickr30k"} == {flickr / "flickr30k-images"}
