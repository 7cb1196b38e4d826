"""Determinism and kill-and-resume on the embedded benchmark (CPU): results.json is byte-identical."""
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SHORT = ["experiment=smoke", "benchmark.tasks=[tiny_choice,tiny_number]", "benchmark.probe.n_problems=4"]


def piece_run(run_dir, *extra, kill_at=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PIECE_KILL_AT", None)
    if kill_at:
        env["PIECE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "piece_cl.cli", *SHORT, f"hydra.run.dir={run_dir}", *extra],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = piece_run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (run_dir / "results.json").read_bytes()


def test_same_command_twice_gives_identical_results(reference, tmp_path):
    proc = piece_run(tmp_path / "again")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "again" / "results.json").read_bytes() == reference


@pytest.mark.parametrize("kill_at", ["step@1", "eval@0", "commit@0", "commit@1"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(reference, tmp_path, kill_at):
    run_dir = tmp_path / "run"
    killed = piece_run(run_dir, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL
    stage = int(kill_at.split("@")[1])
    if (run_dir / "results.json").exists():  # never a finished-looking run after a kill
        assert b'"stages_done": %d' % stage in (run_dir / "results.json").read_bytes()
    resumed = piece_run(run_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if stage > 0:
        assert "resuming after stage" in resumed.stderr
    assert (run_dir / "results.json").read_bytes() == reference
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["stage_1"]
