"""Every baseline runs the embedded default end to end (shortened), writes a full R matrix and resumes
after a crash in its second stage with the same results; a multirun over all twelve method names composes."""
import json

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.conftest import compose_config
from piece_cl.methods.base import METHOD_MODULES
from piece_cl.run import run

BASELINES = ["ewc", "gem", "lwf", "replay", "replay_online", "seqlora", "olora", "layernorm", "migu"]
SHORT = ["experiment=smoke", "benchmark.tasks=[tiny_choice,tiny_number]", "benchmark.train_size=8",
         "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2",
         "model.batch_size=4", "model.max_prompt_len=64", "model.max_answer_len=16",
         "benchmark.eval_size=4", "benchmark.test_size=4", "benchmark.probe.n_problems=2",
         "benchmark.probe.max_new_tokens=8", "model.pretrain.steps=2", "model.pretrain.problems=32",
         "eval.probe_before=false"]


_compose = compose_config


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One pretrained miniature for every run of this file."""
    return tmp_path_factory.mktemp("piece_cache")


class Interrupted(Exception):
    """Stands in for a crash in the middle of a stage (the subprocess SIGKILL tests cover a real kill)."""


def crash_at(point: str, stage: int):
    def maybe_kill(p: str, t: int) -> None:
        if (p, t) == (point, stage):
            raise Interrupted
    return maybe_kill


# name -> (overrides, where the crash is injected: the loop after a step, or the engine after an epoch)
CASES = {
    **{name: ([f"method={name}"], ("piece_cl.run.maybe_kill", "step")) for name in BASELINES},
    "migu_piece_code": (["method=migu", "method.variant=piece_code"], ("piece_cl.run.maybe_kill", "step")),
    # the authors' EWC changes its state while training: the epoch state must carry the online Fisher
    "ewc_official_code": (["method=ewc", "protocol=official_code", "model.epochs=2"],
                          ("piece_cl.training.engine.maybe_kill", "epoch")),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_embedded_default_runs_fills_the_r_matrix_and_resumes_identically(name, shared_cache, tmp_path, monkeypatch):
    """A full run, then a run that crashes in its second stage and is resumed: the same results.json."""
    overrides, (target, point) = CASES[name]
    cfg = _compose(overrides + SHORT + [f"paths.cache_dir={shared_cache}", f"paths.output_root={tmp_path}"])
    run(cfg, tmp_path / "full")
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["method"] == cfg.method.name and results["stages_done"] == 2
    assert [len(row) for row in results["R"]] == [1, 2]
    assert all(0 <= x <= 100 for row in results["R"] for x in row)
    if cfg.method.name == "migu":
        assert (tmp_path / "full" / "stage_1_tiny_number" / "mask.safetensors").is_file()

    with monkeypatch.context() as patch:
        patch.setattr(target, crash_at(point, 1))
        with pytest.raises(Interrupted):
            run(cfg, tmp_path / "resumed")
    run(cfg, tmp_path / "resumed")  # Method.state_dict and the stage-0 checkpoint carry the method over
    # scores on 4 test items are coarse; the final weights and the training losses show any difference
    for name in ("results.json", "stage_1_tiny_number/metrics.json", "checkpoint/stage_1/model.safetensors"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_a_multirun_over_all_twelve_methods_composes():
    """What `piece-run -m method=seqft,ewc,...` expands to: twelve jobs, each composing and resolving."""
    [sweep] = OverridesParser.create().parse_overrides([f"method={','.join(METHOD_MODULES)}"])
    jobs = list(sweep.sweep_string_iterator())
    assert len(jobs) == 12
    for name in jobs:
        resolved = OmegaConf.to_container(_compose([f"method={name}"] + SHORT), resolve=True)
        assert resolved["method"]["name"] == name and resolved["optimizer"]["lr"] > 0
        assert resolved["run_name"] == f"smoke_{name}"
