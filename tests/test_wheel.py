"""The built wheel ships the config tree: an installed piece-run composes from any directory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT


@pytest.mark.slow
def test_wheel_ships_configs_and_composes(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(wheels.glob("piece_cl-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert (site / "piece_cl" / "configs" / "config.yaml").is_file()
    assert (site / "piece_cl" / "configs" / "experiment" / "fig7_k_sweep.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import piece_cl.cli as c; print(c.CONFIG_DIR)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve() == (site / "piece_cl" / "configs").resolve()
    script = site / "bin" / "piece-run"
    out = subprocess.run([sys.executable, str(script), "--cfg", "job", "--resolve", "method=piece_s", "model=llama3_8b"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    cfg = OmegaConf.create(out)
    assert cfg.method.name == "piece_s" and cfg.optimizer.lr == 1e-5
    assert not (elsewhere / "outputs").exists()
