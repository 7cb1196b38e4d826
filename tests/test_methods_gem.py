"""GEM: the projection is the closest gradient satisfying every memory constraint, applied globally."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from piece_cl.methods.gem import project
from tests import methods_kit as kit


def brute_force(g: np.ndarray, memories: np.ndarray) -> np.ndarray:
    """argmin ½‖z − g‖² subject to memories @ z ≥ 0, by a general-purpose solver."""
    result = minimize(lambda z: 0.5 * np.sum((z - g) ** 2), g, jac=lambda z: z - g, method="SLSQP",
                      constraints=[{"type": "ineq", "fun": lambda z: memories @ z, "jac": lambda z: memories}],
                      options={"ftol": 1e-14, "maxiter": 500})
    return result.x


@pytest.mark.parametrize("seed", range(6))
def test_projection_is_the_closest_feasible_gradient(seed):
    rng = np.random.default_rng(seed)
    k = 1 + seed % 5
    memories = rng.normal(size=(k, 30))
    g = -memories.sum(0) + 0.5 * rng.normal(size=30)  # conflicts with (most of) the memories
    assert (memories @ g < 0).any()
    projected = project(torch.from_numpy(g), torch.from_numpy(memories)).numpy()
    assert (memories @ projected >= -1e-6).all()
    np.testing.assert_allclose(projected, brute_force(g, memories), atol=1e-5)


def test_projection_leaves_a_feasible_gradient_alone():
    memories = torch.eye(3, 5, dtype=torch.float64)
    g = torch.arange(5, dtype=torch.float64)
    assert torch.equal(project(g, memories), g)


def test_gem_projects_the_flattened_gradient_through_the_engine(tmp_path):
    """Task b contradicts task a (same prompts, other answers): steps conflict, and each step's gradient
    as the engine sees it afterwards equals the flat projection onto the memory constraints."""
    a = kit.task("a", 8)
    b = kit.Task(name="b", metric="choice", train=[{"prompt": r["prompt"], "answer": "no no no"} for r in a.train],
                 eval=[], test=[])
    method = kit.method("gem", memory_per_task=4)
    runner = kit.Runner(method, kit.model(), tmp_path, epochs=4)
    runner.stage(0, [a, b])  # learnt well enough that unlearning it is a conflict
    assert len(method.memories[0]) == 4 and all(r in a.train for r in method.memories[0])

    checks = []
    original = method.after_backward

    def checked(ctx):
        params = method.trainable(ctx.model)
        flat = lambda grads: torch.cat([g.flatten().double() for g in grads])  # noqa: E731
        g = flat(ctx.engine.get_grad(n, p) for n, p in params)
        memory = flat(method._reference_gradient(ctx, params, method.memories[0]))[None]
        original(ctx)
        after = flat(ctx.engine.get_grad(n, p) for n, p in params)
        checks.append((float(memory[0] @ g), float(memory[0] @ after), float((after - project(g, memory)).abs().max())))

    method.after_backward = checked
    runner.stage(1, [a, b])
    assert checks and method.projections >= 1
    assert any(before < 0 for before, _, _ in checks)
    for before, after, error in checks:
        assert after >= -1e-6 * max(1.0, abs(before)) and error < 1e-6
