"""Every baseline runs the embedded default end to end (shortened) and writes a full R matrix;
a multirun over all twelve method names composes."""
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from piece_cl.cli import CONFIG_DIR
from piece_cl.methods.base import METHOD_MODULES
from piece_cl.run import run

BASELINES = ["ewc", "gem", "lwf", "replay", "replay_online", "seqlora", "olora", "layernorm", "migu"]
SHORT = ["experiment=smoke", "benchmark.tasks=[tiny_choice,tiny_number]", "benchmark.train_size=8",
         "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2",
         "model.batch_size=8", "model.max_prompt_len=64", "model.max_answer_len=16",
         "benchmark.eval_size=4", "benchmark.test_size=4", "benchmark.probe.n_problems=2",
         "benchmark.probe.max_new_tokens=8", "model.pretrain.steps=2", "model.pretrain.problems=32",
         "eval.probe_before=false"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One pretrained miniature for every run of this file."""
    return tmp_path_factory.mktemp("piece_cache")


@pytest.mark.parametrize("name", BASELINES + ["migu_piece_code"])
def test_embedded_default_runs_and_fills_the_r_matrix(name, shared_cache, tmp_path):
    method = ["method=migu", "method.variant=piece_code"] if name == "migu_piece_code" else [f"method={name}"]
    cfg = _compose(method + SHORT + [f"paths.cache_dir={shared_cache}", f"paths.output_root={tmp_path}"])
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == cfg.method.name and results["stages_done"] in (1, 2)
    assert [len(row) for row in results["R"]] == [1, 2]
    assert all(0 <= x <= 100 for row in results["R"] for x in row)
    if cfg.method.name == "migu":
        assert (tmp_path / "stage_1_tiny_number" / "mask.safetensors").is_file()


def test_a_multirun_over_all_twelve_methods_composes():
    """What `piece-run -m method=seqft,ewc,...` expands to: twelve jobs, each composing and resolving."""
    [sweep] = OverridesParser.create().parse_overrides([f"method={','.join(METHOD_MODULES)}"])
    jobs = list(sweep.sweep_string_iterator())
    assert len(jobs) == 12
    for name in jobs:
        resolved = OmegaConf.to_container(_compose([f"method={name}"] + SHORT), resolve=True)
        assert resolved["method"]["name"] == name and resolved["optimizer"]["lr"] > 0
        assert resolved["run_name"] == f"smoke_{name}"
