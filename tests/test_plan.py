"""The memory plan (piece_cl/plan/): every model config plans, the paper models at their published sizes,
the CLI's exits, the warning before the weights load, a tiny prediction against a measurement, and the
GPU check script at its tiny size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from piece_cl.cli import config_options
from piece_cl.plan.cli import compose, main as plan_main
from piece_cl.plan.memory import Planner, sparse_adam_bytes
from piece_cl.plan.report import fit_warning, warn_if_unfit

ROOT = Path(__file__).resolve().parents[1]
PAPER_PARAMS = {"llama3_8b": 8.030e9, "qwen3_14b": 14.768e9, "gemma2_2b": 2.614e9, "llava15_7b": 7.063e9,
                "qwen3_vl_4b": 4.438e9}


@pytest.mark.parametrize("model", config_options("model"))
def test_every_model_config_plans_three_phases(model):
    planner = Planner(compose([f"model={model}", "method=piece_s"]))
    phases = {p.name: p for p in planner.phases()}
    assert list(phases) == ["importance", "training step", "evaluation"]
    weights = planner.counts.total * planner.layout.dtype_bytes
    for phase in phases.values():
        assert phase.parts["weights"] == weights and phase.peak > weights
    # PIECE-S keeps fp32 Σg and Σg² of every eligible entry (one rank: not sharded)
    assert phases["importance"].parts["moments"] == 8 * planner.counts.eligible
    if model in PAPER_PARAMS:
        assert planner.counts.total == pytest.approx(PAPER_PARAMS[model], rel=1e-3)
        assert "published config.json" in planner.origin


def test_sharded_host_and_deepspeed_layouts_change_the_right_parts():
    base = ["model=llama3_8b", "method=piece_s", "trainer=deepspeed", "trainer.micro_batch_size=1"]
    one = Planner(compose(base)).importance()
    four = Planner(compose(base + ["trainer.nproc_per_node=4"])).importance()  # shard_moments: true by default
    host = Planner(compose(base + ["method.importance.moments_device=cpu"])).importance()
    unsharded = Planner(compose(base + ["trainer.nproc_per_node=4", "method.importance.shard_moments=false"]))
    assert unsharded.importance().parts["moments"] == one.parts["moments"]
    assert four.parts["moments"] == pytest.approx(one.parts["moments"] / 4, rel=1e-6)
    assert "moments" not in host.parts and host.host["moments"] == one.parts["moments"]
    assert four.parts["layer sums"] == 2 * 4 * Planner(compose(base)).counts.largest_linear  # Σg, Σg² of lm_head
    seqft = Planner(compose(["model=llama3_8b", "method=seqft", "trainer=deepspeed", "trainer.nproc_per_node=4",
                             "trainer.micro_batch_size=1"])).training()
    n = Planner(compose(["model=llama3_8b", "method=seqft"])).counts.non_embedding
    assert seqft.parts["adam state"] == pytest.approx(12 * n / 4)  # ZeRO-2: fp32 master + moments, 1/4 each
    assert sparse_adam_bytes(1000, weights_fp32=False) == 1000 * (16 + 8)
    for method, key, part in (("ewc", "fisher_device", "fisher+anchor"), ("gem", "grad_device", "reference grads")):
        on_device = Planner(compose(["model=llama3_8b", f"method={method}"])).training()
        on_host = Planner(compose(["model=llama3_8b", f"method={method}", f"method.{key}=cpu"])).training()
        assert part not in on_host.parts and on_host.host[part] == on_device.parts[part] > 0, method
        assert on_host.peak == pytest.approx(on_device.peak - on_device.parts[part]), method


def test_every_method_plans_on_a_tiny_model():
    for method in config_options("method"):
        phases = Planner(compose(["model=tiny_llama", f"method={method}"])).phases()
        assert phases[-1].name == "evaluation" and all(p.peak > 0 for p in phases), method


def test_cli_exit_codes_and_output(capsys):
    assert plan_main(["model=tiny_llama", "method=piece_s", "plan.device_memory_gb=80"]) == 0
    out = capsys.readouterr().out
    assert "dominant phase:" in out and "importance" in out and "device memory 80 GB" in out
    assert plan_main(["model=llama3_8b", "method=piece_s", "trainer.micro_batch_size=8",
                      "plan.device_memory_gb=80"]) == 1
    out = capsys.readouterr().out
    assert "does not fit:" in out
    assert plan_main(["model=tiny_llama", "plan.device_memory_gb=lots"]) == 2
    assert "plan.device_memory_gb must be a number" in capsys.readouterr().err
    assert plan_main(["model=tiny_llama", "plan.gpus=8"]) == 2
    assert plan_main(["model=nonesuch"]) == 2


def test_warning_names_phase_figures_and_settings_that_fit():
    cfg = compose(["model=llama3_8b", "method=piece_s", "trainer.micro_batch_size=8"])
    warning = fit_warning(cfg, 80)
    assert warning.startswith("WARNING memory plan: importance needs") and "would fit:" in warning
    assert "method.importance" in warning
    assert fit_warning(compose(["model=tiny_llama", "method=piece_s"]), 80) is None
    logged = []
    warn_if_unfit(compose(["model=llama3_8b", "method=piece_s", "+plan.device_memory_gb=80",
                           "trainer.micro_batch_size=8"]), logged.append)
    assert len(logged) == 1 and "GB per rank" in logged[0]
    warn_if_unfit(compose(["model=llama3_8b", "method=piece_s", "trainer.device=cpu"]), logged.append)
    assert len(logged) == 1  # a CPU run without a stated device memory is not planned


def test_prediction_at_a_tiny_size_matches_a_measurement():
    """bench_memory's own child process at ≈9M parameters (fp32): predicted peak RSS within 25%."""
    script = ROOT / "scripts" / "bench_memory.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for phase in ("importance_s", "seqft_step"):
        out = subprocess.run([sys.executable, str(script), "--sizes", "9m", "--dtypes", "float32", "--phases", phase,
                              "--json"], capture_output=True, text=True, env=env, check=True, timeout=300).stdout
        point = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        assert abs(point["ratio"] - 1) <= 0.25, point


def test_gpu_check_runs_at_its_tiny_size(tmp_path):
    env = {**os.environ, "GPU_CHECK_TINY": "1", "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("json: "))[len("json: "):])
    for phase in ("importance", "training step"):
        assert result[phase]["peak_bytes"] > 0 and result[phase]["plan_bytes"] > 0
        assert result[phase]["samples_per_s"] > 0
    assert (tmp_path / "bench_importance.txt").read_text().strip()
