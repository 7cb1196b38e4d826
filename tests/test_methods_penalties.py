"""The added losses: EWC's penalty, LwF's distillation, O-LoRA's orthogonality, each against a hand computation."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from piece_cl.methods.lwf import distillation_loss
from tests import methods_kit as kit

TASKS = [kit.task("a", 6), kit.task("b", 6)]


def hand_fisher(net, engine, records, params):
    """mean over samples of (∂ log p(answer | prompt) / ∂θ)², one backward per sample, float64 sums."""
    net.eval()
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    for feature in engine.encode(records):
        batch = engine.batch([feature])
        answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
        loglik = -net(**batch).loss * answer_tokens
        for (n, _), g in zip(params, torch.autograd.grad(loglik, [p for _, p in params])):
            total[n] += g.double() ** 2
    net.train()
    return {n: v / len(records) for n, v in total.items()}


def test_ewc_online_fisher_is_the_authors_sum_of_squared_training_gradients(tmp_path):
    """fisher_source=training: F += (fisher_ranks x share x ∂CE_micro/∂θ)² / micro-batches per epoch, every
    micro-batch of every epoch and task, never reset; no penalty during the first task. At lr 0 the weights
    stay put, so the hand sum needs no replay of the trajectory (and the penalty's gradient is 0 at θ = θ*)."""
    method = kit.method("ewc", fisher_source="training", fisher_ranks=4, lam=200.0)
    runner = kit.Runner(method, kit.model(), tmp_path, factory=kit.optimizer_factory(lr=0.0), epochs=2, shuffle=False)
    net, engine = runner.engine.model, runner.engine
    params = method.trainable(net)
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    for t in range(2):
        features = engine.encode(TASKS[t].train)  # batch 4 = 2 micro-batches of 2, in file order
        micro = [features[i : i + 2] for i in range(0, len(features), 2)]
        for _ in range(2):  # epochs
            for chunk in micro:
                share = len(chunk) / 4 if len(features) % 4 == 0 or chunk is not micro[-1] else 1.0
                loss = net(**engine.batch(chunk)).loss * share
                for (n, _), g in zip(params, torch.autograd.grad(loss, [p for _, p in params])):
                    expected[n] += (4 * g.double()) ** 2 / len(micro)
        out = SimpleNamespace(loss=torch.tensor(1.0))
        if t == 0:
            assert method.loss(runner.context(0, TASKS), {}, out) is out.loss  # no penalty in the first task
        runner.stage(t, TASKS)
    for n, p in params:
        torch.testing.assert_close(method.fisher[n].double(), expected[n], rtol=1e-4, atol=1e-12)
        assert torch.equal(method.anchor[n], p.detach())
    assert not method.handles  # no hook outlives its task
    with torch.no_grad():
        for _, p in params:
            p.add_(0.01)
    penalty = float(method.penalty(net).detach())
    assert penalty > 0
    assert float(method.loss(runner.context(1, TASKS), {}, out).detach()) == pytest.approx(1.0 + penalty)


def test_ewc_fisher_accumulates_and_penalty_and_gradient_match_hand_computation(tmp_path):
    method = kit.method("ewc", lam=0.5)
    runner = kit.Runner(method, kit.model(), tmp_path)
    net = runner.engine.model
    params = method.trainable(net)
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    for t in range(2):  # no training needed: perturb θ between the two Fisher estimates
        with torch.no_grad():
            for _, p in params:
                p.add_(0.01 * torch.randn_like(p))
        for n, f in hand_fisher(net, runner.engine, TASKS[t].train, params).items():
            expected[n] += f
        method.after_task(runner.context(t, TASKS))
    anchor = kit.snapshot(net)
    for n, _ in params:
        torch.testing.assert_close(method.fisher[n].double(), expected[n], rtol=1e-4, atol=1e-10)
        assert torch.equal(method.anchor[n], anchor[n])

    with torch.no_grad():
        for _, p in params:
            p.add_(0.05 * torch.randn_like(p))
    penalty = method.penalty(net)
    grads = torch.autograd.grad(penalty, [p for _, p in params])
    hand = sum(0.5 * (expected[n] * (p.double() - anchor[n].double()) ** 2).sum() for n, p in params)
    assert float(penalty) == pytest.approx(float(hand), rel=1e-4)
    for (n, p), g in zip(params, grads):
        torch.testing.assert_close(g.double(), 2 * 0.5 * expected[n] * (p.detach().double() - anchor[n].double()),
                                   rtol=1e-4, atol=1e-9)
    out = SimpleNamespace(loss=torch.tensor(1.0))
    assert float(method.loss(runner.context(1, TASKS), {}, out)) == pytest.approx(1.0 + float(penalty), rel=1e-6)


def _logits_and_labels():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, -100, 4, 5, -100], [-100, -100, 3, 2, 7, 1]])  # row 0 right padded
    return student, teacher, labels


def test_kd_is_zero_when_student_is_teacher():
    student, _, labels = _logits_and_labels()
    assert float(distillation_loss(student, student.clone(), labels, 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_kd_equals_hand_kl_on_answer_positions_only():
    student, teacher, labels = _logits_and_labels()
    positions = [(b, i) for b in range(2) for i in range(5) if labels[b, i + 1] != -100]
    hand = sum(F.kl_div(F.log_softmax(student[b, i] / 2, -1), F.log_softmax(teacher[b, i] / 2, -1),
                        log_target=True, reduction="sum") for b, i in positions) / len(positions)
    assert float(distillation_loss(student, teacher, labels, 2.0)) == pytest.approx(4 * float(hand), rel=1e-5)

    perturbed = student.clone()
    for b in range(2):
        for i in range(6):
            if (b, i) not in positions:  # prompt, padding and the last position
                perturbed[b, i] += 10 * torch.randn(11)
    assert torch.equal(distillation_loss(perturbed, teacher, labels, 2.0), distillation_loss(student, teacher, labels, 2.0))
    assert not torch.equal(distillation_loss(perturbed, teacher, None, 2.0), distillation_loss(student, teacher, None, 2.0))


def test_lwf_teacher_is_the_model_before_the_task(tmp_path):
    method = kit.method("lwf")
    runner = kit.Runner(method, kit.model(), tmp_path)
    runner.stage(0, TASKS)
    ctx = runner.context(1, TASKS)
    method.before_task(ctx)
    batch = runner.engine.batch(runner.engine.encode(TASKS[1].train[:2]))
    out = runner.engine.model(**batch)
    assert float(method.loss(ctx, batch, out)) == pytest.approx(float(out.loss), rel=1e-6)  # student = teacher
    with torch.no_grad():
        for p in runner.engine.model.parameters():
            p.add_(0.05)
    out = runner.engine.model(**batch)
    assert float(method.loss(ctx, batch, out)) > float(out.loss)
    assert all(not p.requires_grad for p in method.teacher.parameters())


def _lora_pairs(model, name):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]


@pytest.mark.parametrize("penalty", ["frobenius", "l1"])
def test_olora_orthogonality_gradient_matches_hand_computation(tmp_path, penalty):
    method = kit.method("olora", penalty=penalty, gamma=0.5)
    runner = kit.Runner(method, kit.model(), tmp_path)
    runner.stage(0, TASKS)
    method.before_task(runner.context(1, TASKS))
    layers = _lora_pairs(runner.engine.model, "task_1")
    loss = method.loss(None, {}, SimpleNamespace(loss=torch.tensor(0.0)))
    new = [layer.lora_A["task_1"].weight for layer in layers]
    grads = torch.autograd.grad(loss, new)
    hand_loss = 0.0
    for layer, g in zip(layers, grads):
        old, cur = layer.lora_A["task_0"].weight.detach(), layer.lora_A["task_1"].weight.detach()
        m = old @ cur.T
        hand_loss += float((m**2).sum() if penalty == "frobenius" else m.abs().sum())
        hand_grad = 2 * m.T @ old if penalty == "frobenius" else torch.sign(m).T @ old
        torch.testing.assert_close(g, 0.5 * hand_grad)
    assert float(loss) == pytest.approx(0.5 * hand_loss, rel=1e-5)


def test_olora_new_adapter_starts_at_zero_old_frozen_and_eval_weight_is_the_sum(tmp_path):
    method = kit.method("olora")
    runner = kit.Runner(method, kit.model(), tmp_path, factory=kit.optimizer_factory(lr=5e-2))
    net = runner.engine.model
    base = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" not in n}
    runner.stage(0, TASKS)
    first = {n: p.detach().clone() for n, p in net.named_parameters() if ".task_0." in n}
    ctx = runner.context(1, TASKS)
    method.before_task(ctx)
    layers = _lora_pairs(net, "task_1")
    assert layers and all(torch.count_nonzero(l.lora_B["task_1"].weight) == 0 for l in layers)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {n for n in dict(net.named_parameters()) if ".task_1." in n}
    runner.engine.fit(ctx, method, method.train_records(ctx), 1, runner.factory)
    method.after_task(ctx)

    params = dict(net.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in first.items())  # earlier adapter untouched
    assert all(torch.equal(params[n], v) for n, v in base.items())   # W0 untouched
    assert any(torch.count_nonzero(l.lora_B["task_1"].weight) for l in layers)  # the new one learned
    merged = copy.deepcopy(method.eval_model(net)).merge_and_unload()
    merged_params = dict(merged.named_parameters())
    for layer_name, layer in ((n, m) for n, m in net.named_modules() if m in layers):
        delta = sum(layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight for a in ("task_0", "task_1"))
        key = layer_name.replace("base_model.model.", "", 1) + ".weight"
        torch.testing.assert_close(merged_params[key] - layer.base_layer.weight, delta, rtol=1e-5, atol=1e-6)
    batch = runner.engine.batch(runner.engine.encode(TASKS[0].train[:2]))
    net.eval()
    torch.testing.assert_close(merged(**batch).logits, net(**batch).logits, rtol=1e-4, atol=1e-5)
