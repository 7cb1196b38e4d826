"""Bad input gets one clear line on stderr, a non-zero exit, and leaves nothing that looks finished."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TRACE_TASK_FILES = {"train": [{"prompt": "p", "answer": "a"}], "eval": [{"prompt": "p", "answer": "a"}],
                    "test": [{"prompt": "p", "answer": "a"}]}


def piece_run(tmp_path, *overrides, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIECE_OUTPUT_ROOT": str(tmp_path / "outputs"), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "piece_cl.cli", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc


class Result:
    """What an in-process piece-run left: its exit code and stderr (the shape of subprocess.run's result)."""

    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def run_cli(tmp_path, monkeypatch, capsys, *overrides, env_extra=None) -> Result:
    """piece-run in this process (seconds cheaper than a subprocess on a slow machine)."""
    from piece_cl import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["piece-run", *overrides])
    for key, value in {"HF_HUB_OFFLINE": "1", "PIECE_OUTPUT_ROOT": str(tmp_path / "outputs"),
                       "HYDRA_FULL_ERROR": "1", **(env_extra or {})}.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return Result(code, capsys.readouterr().err)


def assert_refused(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("piece-run: error: "), proc.stderr
    assert sum(line.startswith("piece-run: error: ") for line in lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def assert_no_finished_output(tmp_path):
    assert not list((tmp_path / "outputs").rglob("results.json")) if (tmp_path / "outputs").exists() else True


def make_trace_root(tmp_path, task="C-STANCE", **files):
    root = tmp_path / "trace"
    (root / task).mkdir(parents=True)
    for split, content in {**TRACE_TASK_FILES, **files}.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (root / task / f"{split}.json").write_text(text)
    return root


@pytest.mark.parametrize("override,fragment", [
    ("method=foo", "unknown method 'foo'; known:"),
    ("model=gpt5", "unknown model 'gpt5'; known:"),
    ("benchmark=glue", "unknown benchmark 'glue'; known:"),
])
def test_unknown_choices_are_refused_in_one_line(tmp_path, override, fragment):
    proc = piece_run(tmp_path, override)
    assert_refused(proc, fragment)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override,fragment", [
    ("optimizer.lr=0", "optimizer.lr must be a number > 0, got 0"),
    ("optimizer.lr=-1e-5", "optimizer.lr must be a number > 0"),
    ("trainer.epochs=0", "trainer.epochs must be an integer >= 1, got 0"),
    ("method=piece_s method.ratio=0", "method.ratio must be a number in (0, 1], got 0"),
])
def test_non_positive_settings_are_refused(tmp_path, monkeypatch, capsys, override, fragment):
    proc = run_cli(tmp_path, monkeypatch, capsys, *override.split())
    assert_refused(proc, fragment)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_missing_weights_fail_fast_naming_model_and_key(tmp_path):
    proc = piece_run(tmp_path, "model=llama3_8b", "benchmark=trace", env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert_refused(proc, "llama3_8b", "model.path")


def test_missing_data_root_names_the_key(tmp_path):
    proc = piece_run(tmp_path, "benchmark=trace", f"paths.trace_root={tmp_path / 'nowhere'}")
    assert_refused(proc, "paths.trace_root")
    assert_no_finished_output(tmp_path)


def test_malformed_task_file_names_file(tmp_path):
    root = make_trace_root(tmp_path, train="[{\"prompt\": \"p\", ")
    proc = piece_run(tmp_path, "benchmark=trace", "benchmark.tasks=[C-STANCE]", f"paths.trace_root={root}")
    assert_refused(proc, "train.json", "malformed JSON")
    assert_no_finished_output(tmp_path)


def test_wrong_record_shape_names_file_and_record(tmp_path):
    root = make_trace_root(tmp_path, train=[{"prompt": "p", "answer": "a"}, {"question": "q"}])
    proc = piece_run(tmp_path, "benchmark=trace", "benchmark.tasks=[C-STANCE]", f"paths.trace_root={root}")
    assert_refused(proc, "train.json", "record 1")


def test_empty_task_is_refused(tmp_path):
    root = make_trace_root(tmp_path, train=[])
    proc = piece_run(tmp_path, "benchmark=trace", "benchmark.tasks=[C-STANCE]", f"paths.trace_root={root}")
    assert_refused(proc, "C-STANCE", "no training records")


def test_a_finished_run_directory_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "outputs" / "done"
    run_dir.mkdir(parents=True)
    finished = json.dumps({"tasks": ["a"], "R": [[1.0]], "stages_done": 1})
    (run_dir / "results.json").write_text(finished)
    proc = piece_run(tmp_path, f"hydra.run.dir={run_dir}")
    assert_refused(proc, "already holds a finished run")
    assert (run_dir / "results.json").read_text() == finished


def test_resuming_into_a_directory_with_another_config_is_refused(tmp_path):
    run_dir = tmp_path / "outputs" / "half"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 1\n")
    (run_dir / "results.json").write_text(json.dumps({"tasks": ["a", "b"], "R": [[1.0]], "stages_done": 1}))
    proc = piece_run(tmp_path, f"hydra.run.dir={run_dir}", "resume=true")
    assert_refused(proc, "different config", "in the run")
    assert (run_dir / "config.yaml").read_text() == "seed: 1\n"


def test_verbose_shows_the_traceback(tmp_path):
    proc = piece_run(tmp_path, "optimizer.lr=0", "verbose=true")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
