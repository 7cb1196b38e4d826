"""The engine contract: methods use only what `Engine` declares, and the gradients they see are true ones."""
import ast
import re
from pathlib import Path

import torch

from piece_cl.training.engine import Engine, TorchEngine
from tests import methods_kit as kit

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = {name for name in vars(Engine) if not name.startswith("_")} | set(Engine.__annotations__)


def test_methods_use_only_what_the_engine_declares():
    used = {}
    for path in sorted((ROOT / "piece_cl" / "methods").glob("*.py")):
        for member in re.findall(r"\bengine\.([a-z_]\w*)", path.read_text()):
            used.setdefault(member, set()).add(path.name)
    assert used, "no engine use found: the pattern is wrong"
    undeclared = {m: sorted(files) for m, files in used.items() if m not in MEMBERS}
    assert not undeclared, f"methods use engine members the Engine protocol does not declare: {undeclared}"
    assert "grad_scale" not in MEMBERS and "_grad_scale" not in used  # loss scaling stays in the backends


def test_torch_engine_satisfies_the_protocol():
    engine = TorchEngine(kit.config().trainer, kit.model(), kit.tokenizer())
    assert isinstance(engine, Engine)


def test_neither_backend_imports_the_other_and_build_picks_one():
    torch_backend = ast.parse((ROOT / "piece_cl/training/engine.py").read_text())
    imported = {node.module for node in ast.walk(torch_backend) if isinstance(node, ast.ImportFrom)}
    assert not any("deepspeed" in (module or "") or module == "piece_cl.training.build" for module in imported)
    from piece_cl.training.build import build_engine

    engine = build_engine(kit.config(), kit.model(), kit.tokenizer())
    assert type(engine) is TorchEngine


def test_hook_grad_hands_the_true_gradient_whatever_the_backend_scales_losses_by():
    """A backend whose ranks scale their losses (DeepSpeed: by the world size) still shows methods g, not s·g."""
    engine = TorchEngine(kit.config().trainer, kit.model(), kit.tokenizer())
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    seen = []
    engine.hook_grad(param, lambda grad: seen.append(grad.clone()))
    engine._grad_scale = 4.0  # what DeepSpeedEngine reports while it owns the model
    (4.0 * (param * param).sum()).backward()
    assert torch.equal(seen[0], 2 * param.detach())  # d/dθ Σθ² = 2θ, not 4·2θ
    assert torch.equal(param.grad, 8 * param.detach())  # the backend's own buffer keeps its scale

    masked = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    engine.hook_grad(masked, lambda grad: grad * torch.tensor([1.0, 0.0, 1.0]))  # a mask: applied, scale kept
    (4.0 * (masked * masked).sum()).backward()
    assert torch.equal(masked.grad, torch.tensor([8.0, 0.0, 24.0]))
