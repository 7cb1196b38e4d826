"""The embedded miniature really learns and really forgets under SeqFT (a shorter run than the default)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import compose_config

pytestmark = pytest.mark.slow

OVERRIDES = ["benchmark.tasks=[tiny_choice,tiny_number]", "benchmark.train_size=200", "model.epochs=4",
             "benchmark.probe.n_problems=20"]


@pytest.fixture(scope="module")
def seqft_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("embedded") / "run"
    proc = subprocess.run([sys.executable, "-m", "piece_cl.cli", *OVERRIDES, f"hydra.run.dir={run_dir}"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_choice" in proc.stderr and "probe" in proc.stderr  # the R matrix is printed
    return run_dir, json.loads((run_dir / "results.json").read_text())


def untrained_score(task_index: int) -> float:
    from piece_cl.benchmarks.registry import build_benchmark
    from piece_cl.evaluation.evaluate import evaluate_task
    from piece_cl.models.loading import load_model

    cfg = compose_config(OVERRIDES)
    model, tokenizer = load_model(cfg)
    score, _, _ = evaluate_task(model, tokenizer, build_benchmark(cfg).tasks[task_index], cfg.eval)
    return score


def test_tasks_are_really_learned(seqft_run):
    run_dir, results = seqft_run
    for t, name in enumerate(results["tasks"]):
        stats = json.loads(next(run_dir.glob(f"stage_{t}_*")).joinpath("metrics.json").read_text())["train"]
        assert stats["last_loss"] < 0.5 * stats["first_loss"]
    assert results["R"][0][0] > untrained_score(0) + 10


def test_seqft_forgets_the_general_skill_and_earlier_tasks(seqft_run):
    _, results = seqft_run
    probe = results["probe"]
    assert probe["base"] - probe["after_task"][-1] >= 20
    assert results["BWT"][-1] < 0
    assert results["stages_done"] == 2 and [len(row) for row in results["R"]] == [1, 2]
