"""One definition of scope (piece_cl/scope.py): on multimodal models no method trains the vision tower or
the projector unless its config says `train_vision: true`; embeddings stay frozen everywhere."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from piece_cl.benchmarks.registry import Task
from piece_cl.methods.base import METHOD_MODULES
from piece_cl.models.families import MULTIMODAL_FAMILIES, build_tiny
from piece_cl.importance import DEFAULT_EXCLUDE, eligible_parameters
from piece_cl.run import stage_context, train_stage
from piece_cl.scope import exclude_patterns, is_vision as scope_is_vision, out_of_scope
from piece_cl.training.engine import TorchEngine
from tests import methods_kit as kit

# MIGU's 0.1% of rows of a tiny model is no row at all. EWC's posterior Fisher (importance.estimate) does not
# take image batches yet, so EWC runs with the authors' online Fisher here (the scope is the same).
OVERRIDES = {"migu": {"ratio": 0.1}, "piece_f": {"ratio": 0.01}, "piece_s": {"ratio": 0.01},
             "ewc": {"fisher_source": "training"}}
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "model.visual.")


@pytest.fixture(scope="module")
def image_tasks(tmp_path_factory) -> list[Task]:
    folder = tmp_path_factory.mktemp("images")
    tasks = []
    for t, colors in enumerate([("red", "green", "blue", "white"), ("black", "red", "green", "blue")]):
        records = []
        for i, color in enumerate(colors):
            path = folder / f"task{t}_{i}.png"
            Image.new("RGB", (24 + 8 * i, 32), color).save(path)
            records.append({"prompt": f"What color is image {i}?", "answer": color, "image": str(path)})
        tasks.append(Task(name=f"vqa{t}", metric="choice", train=records, eval=[], test=[]))
    return tasks


def is_vision(name: str) -> bool:
    return any(prefix in name for prefix in VISION_PREFIXES)


def two_stages(family: str, method, tasks, tmp_path) -> tuple[dict, dict, set[str]]:
    """Two stages of `method` on the tiny `family` through run.py's stage; (before, after, names trained)."""
    model, processor = build_tiny(family)
    cfg = kit.config(max_prompt_len=64, batch_size=4, micro_batch_size=2)
    engine = TorchEngine(cfg.trainer, method.setup(model), processor)
    before = kit.snapshot(engine.model)
    trained: set[str] = set()
    factory = kit.optimizer_factory()
    for t in range(2):
        ctx = stage_context(cfg, t, tasks, engine, method, factory, tmp_path / f"stage_{t}", log=lambda m: None)
        train_stage(ctx, method, factory,
                    before_fit=lambda c: trained.update(n for n, p in method.trainable(c.model) if p.requires_grad))
    return before, kit.snapshot(engine.model), trained


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
@pytest.mark.parametrize("family", MULTIMODAL_FAMILIES)
def test_no_method_trains_the_vision_side_unless_configured(family, name, image_tasks, tmp_path):
    torch.manual_seed(0)
    method = kit.method(name, **OVERRIDES.get(name, {}))
    before, after, trained = two_stages(family, method, image_tasks, tmp_path)
    vision = [n for n in before if is_vision(n)]
    assert vision, "the family has no vision tower: the prefixes are wrong"
    assert not [n for n in trained if is_vision(n)], f"{name} hands vision-side tensors to its optimiser"
    moved = [n for n in vision if not torch.equal(before[n], after[n])]
    assert not moved, f"{name} trained {len(moved)} vision-side tensors on {family}, e.g. {moved[:3]}"
    assert any(not torch.equal(before[n], after[n]) for n in before if n not in vision), f"{name} trained nothing"


def test_train_vision_true_takes_the_vision_side_back(image_tasks, tmp_path):
    torch.manual_seed(0)
    before, after, trained = two_stages("llava", kit.method("seqft", train_vision="true"), image_tasks, tmp_path)
    assert any(is_vision(n) for n in trained)
    assert any(not torch.equal(before[n], after[n]) for n in before if ".vision_tower." in n)
    assert not any(not torch.equal(before[n], after[n]) for n in before if ".embed_tokens." in n)


@pytest.mark.parametrize("name,frozen", [
    ("model.embed_tokens.weight", True), ("transformer.wte.weight", True), ("transformer.wpe.weight", True),
    ("model.language_model.embed_tokens.weight", True),
    ("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", True),
    ("model.multi_modal_projector.linear_1.weight", True),
    ("model.visual.blocks.0.attn.qkv.weight", True), ("model.visual.merger.linear_fc1.weight", True),
    ("model.language_model.layers.0.self_attn.q_proj.weight", False), ("lm_head.weight", False),
    ("model.layers.0.mlp.visualiser.weight", False), ("model.norm.weight", False),
])
def test_one_rule_for_every_user(name, frozen):
    """Methods (out_of_scope), importance (DEFAULT_EXCLUDE), PIECE/MIGU (exclude_patterns) and the report agree."""
    import re

    from piece_cl.report.masks import module_of

    assert out_of_scope(name) is frozen
    assert any(re.search(p, name) for p in DEFAULT_EXCLUDE) is frozen
    assert any(re.search(p, name) for p in exclude_patterns(kit.method("piece_s").cfg)) is frozen
    assert (module_of(name) is None) is scope_is_vision(name)


def test_method_configs_leave_scope_to_scope_py():
    for name in ("piece_f", "piece_s", "migu"):
        assert list(kit.method(name).cfg.exclude) == [], f"configs/method/{name}.yaml repeats scope.py in exclude:"
    model, _ = build_tiny("qwen3_vl")
    assert not [n for n, _ in eligible_parameters(model) if scope_is_vision(n)]
