"""Which parameters each method lets move: SeqFT, LayerNorm, SeqLoRA, MIGU (both variants)."""
import re

import pytest
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file
from torch import nn

from piece_cl.methods.layernorm import is_norm
from piece_cl.methods.migu import _ChannelScores
from piece_cl.methods.seqlora import lora_config
from tests import methods_kit as kit

TASKS = [kit.task("a"), kit.task("b")]


def changed(before, net):
    return {n for n, p in net.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


def test_seqft_moves_every_eligible_parameter_and_no_embedding(tmp_path):
    net = kit.model()
    before = kit.snapshot(net)
    kit.Runner(kit.method("seqft"), net, tmp_path).stage(0, TASKS)
    assert changed(before, net) == {n for n in before if "embed_tokens" not in n}


def test_layernorm_trains_norms_only(tmp_path):
    net = kit.model()
    before = kit.snapshot(net)
    kit.Runner(kit.method("layernorm"), net, tmp_path).stage(0, TASKS)
    norms = {n for n in before if n.endswith("norm.weight")}
    assert len(norms) == 2 * 2 + 1 and changed(before, net) == norms


@pytest.mark.parametrize("name,norm", [
    ("model.layers.3.pre_feedforward_layernorm.weight", True),      # Gemma2
    ("model.layers.3.post_feedforward_layernorm.weight", True),
    ("model.layers.0.self_attn.q_norm.weight", True),               # Qwen3
    ("model.language_model.norm.weight", True),                     # LLaVA / Qwen3-VL language model
    ("model.vision_tower.vision_model.encoder.layers.0.layer_norm1.weight", False),
    ("model.visual.blocks.0.norm1.weight", False),
    ("model.layers.0.mlp.down_proj.weight", False),
])
def test_norm_names_of_the_five_architectures(name, norm):
    assert is_norm(name) is norm


def test_seqlora_changes_only_adapters(tmp_path):
    method = kit.method("seqlora")
    runner = kit.Runner(method, kit.model(), tmp_path, factory=kit.optimizer_factory(lr=5e-2))
    before = kit.snapshot(runner.engine.model)
    for t in range(2):
        runner.stage(t, TASKS)
    moved = changed(before, runner.engine.model)
    assert moved and all(".lora_B." in n or ".lora_A." in n for n in moved)
    assert {re.sub(r"\.lora_[AB]\..*", "", n).split(".")[-1] for n in moved} == {"q_proj", "v_proj"}
    state = method.state_dict()["adapters"]
    assert set(state) == {n for n in before if "lora_" in n}


def test_lora_targets_only_the_language_model_of_a_multimodal_model():
    class Multimodal(nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = nn.ModuleDict({"q_proj": nn.Linear(2, 2)})
            self.vision_tower = nn.ModuleDict({"q_proj": nn.Linear(2, 2)})

    cfg = kit.method("seqlora").cfg
    multimodal = lora_config(cfg, Multimodal())
    assert check_target_module_exists(multimodal, "model.language_model.layers.0.self_attn.q_proj")
    assert not check_target_module_exists(multimodal, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    text = lora_config(cfg, kit.model())
    assert check_target_module_exists(text, "model.layers.0.self_attn.v_proj")
    assert not check_target_module_exists(text, "model.layers.0.self_attn.k_proj")


def test_channel_scores_are_l1_norms_of_outputs_and_inputs_over_real_tokens():
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    x = torch.randn(2, 3, 5)
    tokens = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for by_input in (False, True):
        hooks = _ChannelScores({"w": layer}, by_input)
        hooks.tokens = tokens
        with torch.no_grad():
            layer(x)
        hooks.close()
        kept = x[tokens.bool()]
        expected = kept.abs().sum(0) if by_input else (kept @ layer.weight.T).abs().sum(0)
        torch.testing.assert_close(hooks.scores["w"], expected)


def _migu_run(tmp_path, variant):
    net = kit.model()
    before = kit.snapshot(net)
    runner = kit.Runner(kit.method("migu", ratio=0.05, variant=variant), net, tmp_path,
                        factory=kit.optimizer_factory(lr=5e-2, weight_decay=0.1))
    ctx = runner.stage(0, TASKS)
    return net, before, load_file(str(ctx.stage_dir / "mask.safetensors"))


def _outside_mask_identical(net, before, masks, fully_trainable=()):
    for name, param in net.named_parameters():
        if name in fully_trainable:
            continue
        keep = torch.ones(param.numel(), dtype=torch.bool)
        if name in masks:
            keep[masks[name]] = False
        assert torch.equal(param.detach().flatten()[keep], before[name].flatten()[keep]), name


def test_migu_paper_selects_global_top_rows_and_freezes_the_rest(tmp_path):
    net, before, masks = _migu_run(tmp_path, "paper")
    linears = {f"{n}.weight": m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    rows = sum(m.out_features for m in linears.values())
    selected_rows = sum(len(masks[n]) // linears[n].in_features for n in masks)
    assert selected_rows == int(0.05 * rows)
    for name, index in masks.items():  # whole rows
        per_row = torch.bincount(index // linears[name].in_features)
        assert set(per_row[per_row > 0].tolist()) == {linears[name].in_features}
    _outside_mask_identical(net, before, masks)  # with weight decay 0.1
    assert changed(before, net) == set(masks)


def test_migu_piece_code_unmasks_columns_per_layer_and_trains_down_lm_head_norm(tmp_path):
    net, before, masks = _migu_run(tmp_path, "piece_code")
    full = {n for n in before if re.search(r"down_proj\.weight$|^lm_head\.weight$|^model\.norm\.weight$", n)}
    for name, index in masks.items():
        rows, cols = dict(net.named_parameters())[name].shape
        assert len(index) == rows * max(1, int(0.05 * cols))
        assert len(torch.unique(index % cols)) == max(1, int(0.05 * cols))
    assert not full & set(masks)
    _outside_mask_identical(net, before, masks, full)
    assert full <= changed(before, net)
