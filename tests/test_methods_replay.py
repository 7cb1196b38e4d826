"""Replay and Replay-online: what goes into the buffer, when it is trained on, and how it is mixed."""
from collections import Counter

import pytest
import torch

from piece_cl.methods.replay import sample_fraction
from tests import methods_kit as kit


def test_uniform_sample_has_the_configured_size_and_is_uniform_over_records():
    records = [{"prompt": str(i), "answer": ""} for i in range(50)]
    counts = Counter()
    for seed in range(2000):
        sample = sample_fraction(records, 0.1, "uniform", 1, seed)
        assert len(sample) == 5 and len({r["prompt"] for r in sample}) == 5
        counts.update(r["prompt"] for r in sample)
    assert sample_fraction(records, 0.1, "uniform", 1, 3) == sample_fraction(records, 0.1, "uniform", 1, 3)
    expected = 2000 * 0.1  # every record drawn with probability 0.1: 200 ± 3σ (σ ≈ 13.4)
    assert all(abs(counts[str(i)] - expected) < 45 for i in range(50))


def test_first_sampling_and_minimum():
    records = [{"prompt": str(i), "answer": ""} for i in range(50)]
    assert sample_fraction(records, 0.1, "first", 1, 0) == records[:5]
    assert len(sample_fraction(records, 0.01, "uniform", 1, 0)) == 1  # round(0.5) = 0 -> the minimum


@pytest.fixture(scope="module")
def three_tasks():
    return [kit.task(name, 8) for name in ("a", "b", "c")]


def test_replay_trains_an_extra_phase_on_past_tasks_only(tmp_path, three_tasks):
    method = kit.method("replay", fraction=0.25)
    runner = kit.Runner(method, kit.model(), tmp_path)
    for t in range(3):
        runner.stage(t, three_tasks)
    a, b, c = (task.train for task in three_tasks)
    assert runner.fitted[0] == a and runner.fitted[1] == b and runner.fitted[3] == c
    assert len(runner.fitted) == 5  # no extra phase after the first task
    first_replay, second_replay = runner.fitted[2], runner.fitted[4]
    assert len(first_replay) == 2 and all(r in a for r in first_replay)
    assert sum(r in a for r in second_replay) == 2 and sum(r in b for r in second_replay) == 2
    assert not any(r in c for r in second_replay)  # never the task just learned
    assert [len(v) for v in method.state_dict()["buffer"].values()] == [2, 2, 2]


def test_replay_every_epoch_replays_the_buffer_after_each_epoch_of_the_task(tmp_path, three_tasks):
    """The authors' schedule: the task's own records each epoch, then a pass over the buffer (after_epoch)."""
    method = kit.method("replay", fraction=0.25, every_epoch=True)
    runner = kit.Runner(method, kit.model(), tmp_path, epochs=2)
    for t in range(2):
        runner.stage(t, three_tasks)
    a, b = three_tasks[0].train, three_tasks[1].train
    buffer = method.state_dict()["buffer"]["a"]
    assert runner.fitted == [a, b, buffer, buffer]  # no pass in the first task; one per epoch of the second
    assert len(buffer) == 2 and all(r in a for r in buffer)


def test_official_code_replay_and_replay_online_train_differently(tmp_path, three_tasks):
    """Defect: under protocol=official_code both replay methods interleaved, so their Table 1 rows were one run."""
    weights = {}
    for name in ("replay", "replay_online"):
        method = kit.method(name, protocol="official_code")
        runner = kit.Runner(method, kit.model(), tmp_path / name, epochs=2)
        for t in range(2):
            runner.stage(t, three_tasks)
        weights[name] = kit.snapshot(runner.engine.model)
        weights[name + "_fits"] = [len(records) for records in runner.fitted]
    assert any(not torch.equal(weights["replay"][n], weights["replay_online"][n]) for n in weights["replay"])
    assert weights["replay_fits"] == [8, 8, 1, 1]  # the first 10% (>= 1) of task a, after each epoch of b
    assert weights["replay_online_fits"] == [8, 9]  # mixed into task b's epochs


def test_replay_online_gives_every_batch_its_share_of_past_data(tmp_path):
    tasks = [kit.task("a", 40), kit.task("b", 40), kit.task("c", 100)]
    method = kit.method("replay_online", fraction=0.25)
    method.buffer = {"a": tasks[0].train[:10], "b": tasks[1].train[:10]}  # 20 past samples for 100 current ones
    ctx = kit.Runner(method, kit.model(), tmp_path).context(2, tasks)
    mixed = method.train_records(ctx)
    assert len(mixed) == 120 and sorted(map(str, mixed)) == sorted(map(str, tasks[2].train + tasks[0].train[:10] + tasks[1].train[:10]))
    batch = 12  # share 20/120 = 1/6: two past samples per batch of 12, everywhere in the epoch
    shares = [sum(r not in tasks[2].train for r in mixed[i : i + batch]) for i in range(0, 120, batch)]
    assert shares == [2] * 10


def test_replay_online_trains_its_mix_and_no_extra_phase(tmp_path, three_tasks):
    method = kit.method("replay_online", fraction=0.25)
    runner = kit.Runner(method, kit.model(), tmp_path)
    for t in range(2):
        runner.stage(t, three_tasks)
    assert len(runner.fitted) == 2 and len(runner.fitted[1]) == 10
