"""Evaluation split across ranks: each rank generates its share of one process's batches and executes
its share of the programs; the gathered outputs are one process's. Simulated here with the shards of
two ranks in one process (the 2-rank end-to-end check is in tests/test_deepspeed.py)."""
import pytest

from piece_cl.data import mini_humaneval
from piece_cl.evaluation import code_probe, generation
from piece_cl.evaluation.code_probe import CodeProbe
from piece_cl.evaluation.generation import generate
from piece_cl.evaluation.sandbox import ExecResult
from piece_cl.evaluation.sharding import Shard
from tests.test_miniature import cached_miniature  # noqa: F401 - the fixture


class LocalShard(Shard):
    """One of several ranks in one process: gather returns what this rank made (others stay missing)."""

    def gather(self, local):
        self.made = dict(local)
        return {i: local.get(i, self.missing) for i in range(self.size)}


def shards(world: int, size: int, missing=None) -> list[LocalShard]:
    out = [LocalShard(rank, world) for rank in range(world)]
    for shard in out:
        shard.size, shard.missing = size, missing
    return out


@pytest.mark.parametrize("do_sample", [False, True])
def test_two_shards_generate_disjoint_halves_equal_to_one_process(cached_miniature, do_sample):  # noqa: F811
    _, model, tokenizer = cached_miniature
    prompts = [p["prompt"] for p in mini_humaneval.probe_problems(7)] + ["def", "Solve the following math problem."]
    kwargs = dict(max_new_tokens=10, batch_size=2, do_sample=do_sample, top_k=10, temperature=1.5, seed=3)
    whole = generate(model, tokenizer, prompts, **kwargs)
    ranks = shards(2, len(prompts))
    for shard in ranks:
        generate(model, tokenizer, prompts, shard=shard, **kwargs)
    assert ranks[0].made.keys().isdisjoint(ranks[1].made.keys())
    assert {**ranks[0].made, **ranks[1].made} == dict(enumerate(whole))
    # 9 prompts in batches of 2: batches 0, 2, 4 (5 prompts) on rank 0, batches 1, 3 (4 prompts) on rank 1
    assert [s.generated for s in ranks] == [5, 4]


def test_each_rank_executes_only_its_share_of_the_programs(monkeypatch):
    problems = mini_humaneval.probe_problems(5)
    monkeypatch.setattr(generation, "generate",
                        lambda model, tokenizer, prompts, **kw: [p["canonical_solution"] for p in problems])
    executed = []
    real = code_probe.check_candidates
    monkeypatch.setattr(code_probe, "check_candidates",
                        lambda candidates, **kw: executed.append(len(candidates)) or real(candidates, **kw))
    not_mine = ExecResult(False, "not this rank's", "")
    for shard in shards(2, len(problems), missing=not_mine):
        _, records = CodeProbe("probe", problems, timeout=5.0).evaluate(None, None, {"batch_size": 2}, shard)
        assert [r["status"] for r in records] == ["passed" if shard.owns(i) else "not this rank's"
                                                  for i in range(len(problems))]
    assert executed == [3, 2]  # problems 0, 2, 4 on rank 0; 1, 3 on rank 1: each program runs once


def test_a_shard_of_one_is_the_whole_evaluation():
    shard = Shard.current()
    assert (shard.rank, shard.world) == (0, 1)
    assert shard.map(lambda items: [x * 2 for x in items], [1, 2, 3]) == [2, 4, 6]
    assert shard.work_per_rank() == [0]
