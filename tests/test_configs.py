"""Every config in configs/ composes; the paper's settings land where the runner reads them."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from piece_cl.cli import GROUPS, config_options
from tests.conftest import compose_config

CHOICES = [(group, name) for group in GROUPS for name in config_options(group)]


_compose = compose_config


def test_every_group_has_options():
    for group in GROUPS:
        assert config_options(group), f"config group {group} is empty"


@pytest.mark.parametrize("group,name", CHOICES, ids=[f"{g}={n}" for g, n in CHOICES])
def test_every_config_composes_and_resolves(group, name):
    cfg = _compose([f"{group}={name}"])
    container = OmegaConf.to_container(cfg, resolve=True)
    if group != "experiment":
        assert cfg[group] is not None
    assert container["optimizer"]["lr"] > 0


def test_slurm_launcher_composes():
    cfg = _compose(["hydra/launcher=slurm"], hydra=True)
    assert cfg.hydra.launcher.tasks_per_node == 1
    assert "submitit" in cfg.hydra.launcher._target_


def test_paper_settings_for_llama3_8b():
    cfg = _compose(["method=piece_s", "model=llama3_8b", "benchmark=trace"])
    assert cfg.optimizer.lr == 1e-5 and cfg.trainer.epochs == 5 and cfg.trainer.batch_size == 64
    assert cfg.seed == 42 and list(cfg.optimizer.betas) == [0.9, 0.95] and cfg.method.ratio == 0.001
    assert list(cfg.benchmark.tasks) == ["C-STANCE", "FOMC", "MeetingBank", "ScienceQA", "NumGLUE-cm",
                                         "NumGLUE-ds", "20Minuten", "Py150"]


def test_lora_methods_take_the_lora_learning_rate():
    assert _compose(["method=seqlora", "model=gemma2_2b"]).optimizer.lr == 5e-4
    assert _compose(["method=olora", "model=llama3_8b"]).optimizer.lr == 1e-4
    assert _compose(["method=seqft", "model=gemma2_2b"]).optimizer.lr == 5e-5


def test_qwen3_14b_trains_one_epoch():
    assert _compose(["model=qwen3_14b"]).trainer.epochs == 1


def test_protocol_switches_the_authors_values():
    paper = _compose(["method=ewc"])
    official = _compose(["method=ewc", "protocol=official_code"])
    assert paper.method.lam == 0.5 and official.method.lam == 200.0
    assert _compose(["method=piece_s", "protocol=official_code"]).method.importance.granularity == "batch"


def test_k_sweep_experiment_declares_the_figure7_ratios():
    cfg = _compose(["experiment=fig7_k_sweep"], hydra=True)
    assert cfg.method.name == "piece_s"
    assert cfg.hydra.sweeper.params["method.ratio"] == "0.0001,0.0005,0.001,0.005,0.01,0.05"


def test_run_dirs_are_unique_to_the_microsecond():
    cfg = _compose([], hydra=True)
    assert "%f" in OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "piece_cl.cli", "--cfg", "job", "--resolve", "method=piece_s",
                          "model=llama3_8b", "benchmark=trace"], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout
    cfg = OmegaConf.create(out)
    assert cfg.optimizer.lr == 1e-5 and cfg.method.name == "piece_s" and cfg.model.path == "meta-llama/Meta-Llama-3-8B"
    assert not (tmp_path / "outputs").exists()
