"""Names of models and methods live in one place, their configs' `paper_name`: the report joins our rows to
the paper's by those names, so every row of the paper's tables must name exactly one config."""
import json

import yaml

from piece_cl.report.paper import (BASE, METHOD_NAMES, MODEL_NAMES, config_paper_names, load_paper_table,
                                   sort_key)
from piece_cl.report.runs import load_run


def test_every_paper_row_names_one_config():
    for benchmark in ("trace", "vqa"):
        table = load_paper_table(benchmark)
        for model, method in table.rows:
            assert list(config_paper_names("model").values()).count(model) == 1, model
            assert method == BASE or list(config_paper_names("method").values()).count(method) == 1, method


def test_names_follow_the_paper_order():
    assert list(METHOD_NAMES)[:4] == [BASE, "seqft", "ewc", "gem"] and list(METHOD_NAMES)[-2:] == ["piece_f", "piece_s"]
    assert list(MODEL_NAMES)[:5] == ["gemma2_2b", "llama3_8b", "qwen3_14b", "qwen3_vl_4b", "llava15_7b"]
    assert sort_key("Llama3-8B", "PIECE-S") < sort_key("Qwen3-14B", "SeqFT") < sort_key("Tiny-Llama", "base")


def _run(tmp_path, config):
    (tmp_path / "results.json").write_text(json.dumps({"model": "llama3_8b", "method": "piece_s",
                                                       "tasks": ["a"], "R": [[1.0]]}))
    if config is not None:
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return load_run(tmp_path)


def test_a_run_is_named_by_its_own_config_else_the_shipped_one(tmp_path):
    assert (_run(tmp_path, None).model, _run(tmp_path, None).method) == ("Llama3-8B", "PIECE-S")
    renamed = _run(tmp_path, {"model": {"name": "llama3_8b", "paper_name": "Llama3-8B-Instruct"},
                              "method": {"name": "piece_s", "paper_name": "PIECE-S*"}})
    assert (renamed.model, renamed.method) == ("Llama3-8B-Instruct", "PIECE-S*")


def test_a_display_name_does_not_block_resume():
    from piece_cl.cli import config_difference

    old = {"model": {"name": "tiny", "lr": 1e-3}, "protocol": {"name": "paper", "ewc_lambda": 0.5}}
    new = {"model": {"name": "tiny", "lr": 1e-3, "paper_name": "Tiny-Llama"}, "protocol": {"ewc_lambda": 0.5}}
    assert config_difference(old, new) is None
    assert config_difference(old, {**new, "model": {**new["model"], "lr": 2e-3}}).startswith("model.lr")
