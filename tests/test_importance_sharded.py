"""Importance across ranks and on one device: the data-parallel split, the sharded sums and top-k on 2 gloo
ranks against one process; host-memory sums, bf16 accumulation and the byte formula in one process."""
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from piece_cl.errors import PieceError
from piece_cl.evaluation.sharding import Shard
from piece_cl.importance import ShardedScores, _span, estimate, moment_bytes, select_top_k
from tests import methods_kit as kit
from tests.test_importance import make_batches, tiny_llama

OFFICIAL = {"importance.granularity": "batch", "importance.reduction": "mean", "importance.xi_on_sums": "true"}
CASES = {  # (method, overrides): the paper's and the official code's importance, F and S
    "piece_f/paper": ("piece_f", {}),
    "piece_s/paper": ("piece_s", {}),
    "piece_f/official_code": ("piece_f", OFFICIAL),
    "piece_s/official_code": ("piece_s", OFFICIAL),
}
RATIO = 0.05
TIED_RATIOS = (0.05, 0.3, 0.55, 1.0)
SAMPLES = 14  # chunks of 4 (4, 4, 4, 2): rank 0 gets chunks 0 and 2, rank 1 chunks 1 and 3


def _run_cases(tmp, rank: int, keep_scores: bool = False) -> dict:
    """Each case's mask (and the work counts) from the torch engine's PIECE before_task, plus EWC's Fisher.

    `keep_scores` (one process only) keeps the scores too, to show that any mask difference is a tie."""
    import piece_cl.methods.piece as piece

    out = {}
    task = kit.task("t0", SAMPLES)
    real = piece.estimate
    for case, (name, overrides) in CASES.items():
        method = kit.method(name, ratio=RATIO, **{"importance.chunk_size": 4, "importance.batch_size": 3}, **overrides)
        runner = kit.Runner(method, kit.model(seed=3), tmp / f"{case.replace('/', '_')}_{rank}")
        captured = {}
        if keep_scores:
            piece.estimate = lambda *a, **kw: captured.setdefault("scores", real(*a, **kw))
        try:
            method.before_task(runner.context(0, [task]))
        finally:
            piece.estimate = real
        out[case] = {"masks": {n: i.clone() for n, i in method.masks.items()}, "work": dict(method.importance_work),
                     "scores": captured.get("scores")}
    ewc = kit.method("ewc")
    runner = kit.Runner(ewc, kit.model(seed=3), tmp / f"ewc_{rank}")
    ewc.after_task(runner.context(0, [task]))
    out["ewc"] = {"fisher": {n: f.clone() for n, f in ewc.fisher.items()}, "work": dict(ewc.fisher_work)}
    return out


def _tied_scores() -> dict[str, torch.Tensor]:
    """Heavy ties (values in steps of 0.5), zeros, and a one-entry tensor that one rank does not own."""
    gen = torch.Generator().manual_seed(5)
    sizes = {"b.weight": (7, 5), "a.bias": (1,), "c.weight": (13,), "a.weight": (4, 4)}
    return {n: torch.randint(0, 4, shape, generator=gen).float() / 2 for n, shape in sizes.items()}


def _sharded_select(shard: Shard, ratio: float) -> dict[str, torch.Tensor]:
    scores = _tied_scores()
    spans = {n: _span(t.numel(), shard) for n, t in scores.items()}
    local = {n: t.reshape(-1)[spans[n][0] : spans[n][1]].clone() for n, t in scores.items()}
    sharded = ShardedScores(local, {n: lo for n, (lo, _) in spans.items()}, {n: t.shape for n, t in scores.items()}, shard)
    return select_top_k(sharded, ratio)


def _worker(rank: int, world: int, tmp: str) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        result = _run_cases(Path(tmp), rank)
        result["tied"] = {ratio: _sharded_select(Shard.current(), ratio) for ratio in TIED_RATIOS}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)


@pytest.mark.distributed
def test_two_gloo_ranks_give_one_process_masks_each_on_half_the_samples(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    one = _run_cases(tmp_path, 0, keep_scores=True)  # this process has no process group: world 1
    differences = {}
    for case in CASES:
        a, b, ref = ranks[0][case], ranks[1][case], one[case]
        assert a["masks"].keys() == b["masks"].keys()
        assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])  # every rank, the same mask
        # each rank estimated on its own half. paper: chunks of 4, 4, 4, 2 samples, rank 0 chunks 0 and 2;
        # official_code: the groups are the 5 batches of 3, 3, 3, 3, 2 samples, rank 0 batches 0, 2 and 4
        expected = [8, 6] if "paper" in case else [3, 2]
        assert [ranks[r][case]["work"]["samples_here"] for r in range(2)] == expected, case
        assert a["work"]["samples"] == ref["work"]["samples"] and a["work"]["world"] == 2 and a["work"]["sharded"]
        # ≈ half of one process's sums on each rank
        assert a["work"]["moment_bytes"] + b["work"]["moment_bytes"] == ref["work"]["moment_bytes"]
        assert max(a["work"]["moment_bytes"], b["work"]["moment_bytes"]) <= 0.55 * ref["work"]["moment_bytes"]
        differing = _differing_entries(a["masks"], ref["masks"])
        differences[case] = len(differing)
        if differing:  # only where the scores tie to float rounding with the threshold
            scores = ref["scores"]
            kth = min(float(scores[n].reshape(-1)[ref["masks"][n]].min()) for n in ref["masks"])
            values = torch.tensor([float(scores[n].reshape(-1)[i]) for n, i in differing])
            assert torch.allclose(values, torch.full_like(values, kth), rtol=1e-5), (case, len(differing))
        assert len(differing) <= 2, (case, differing)
        assert sum(i.numel() for i in a["masks"].values()) == sum(i.numel() for i in ref["masks"].values())
    print("mask entries differing from one process:", differences)
    for ratio in TIED_RATIOS:  # the sharded radix select's tie rule is the one-process rule
        want = select_top_k(_tied_scores(), ratio)
        for r in range(2):
            got = ranks[r]["tied"][ratio]
            assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), (ratio, r)
    fisher = [ranks[r]["ewc"]["fisher"] for r in range(2)]
    for name, ref in one["ewc"]["fisher"].items():
        assert torch.equal(fisher[0][name], fisher[1][name])
        assert torch.allclose(fisher[0][name], ref, rtol=1e-5, atol=1e-12), name
    assert [ranks[r]["ewc"]["work"]["samples_here"] for r in range(2)] == [8, 6]  # micro batch 2: 7 chunks


def _differing_entries(a: dict, b: dict) -> list[tuple[str, int]]:
    out = []
    for name in set(a) | set(b):
        x = set(a.get(name, torch.empty(0, dtype=torch.long)).tolist())
        y = set(b.get(name, torch.empty(0, dtype=torch.long)).tolist())
        out += [(name, i) for i in sorted(x ^ y)]
    return out


# -- one process ---------------------------------------------------------------------------------------
def test_host_memory_sums_give_the_same_scores():
    model = tiny_llama(torch.float32)
    batches = make_batches()
    for kind in ("fisher", "s"):
        on_device = estimate(model, batches, kind, chunk_size=3)
        work = {}
        on_host = estimate(model, batches, kind, chunk_size=3, moments_device="cpu", work=work)
        assert all(torch.equal(on_device[n], on_host[n]) for n in on_device)
        assert work["samples"] == work["samples_here"] == 12 and work["world"] == 1


def test_bf16_accumulation_halves_the_sums_and_is_only_approximately_fp32():
    model = tiny_llama(torch.float32)
    batches = make_batches()
    fp32_work, bf16_work = {}, {}
    fp32 = estimate(model, batches, "s", granularity="batch", reduction="mean", xi=1.0, xi_on_sums=True, work=fp32_work)
    bf16 = estimate(model, batches, "s", granularity="batch", reduction="mean", xi=1.0, xi_on_sums=True,
                    accumulate="bfloat16", work=bf16_work)
    assert bf16_work["moment_bytes"] * 2 == fp32_work["moment_bytes"]
    worst = max(float(((bf16[n] - fp32[n]).abs() / fp32[n].abs().max()).max()) for n in fp32)
    assert 0 < worst < 2e-2  # bf16 keeps 8 bits: rounding shows, the ranking's scale does not change
    assert all(torch.equal(bf16[n].bfloat16().float(), bf16[n]) for n in bf16)  # scored in bf16, as the authors
    with pytest.raises(PieceError, match="accumulate"):
        estimate(model, batches, "s", accumulate="float16")


def test_moment_bytes_is_the_sums_per_rank():
    assert moment_bytes(1000, 1, "s") == 2 * 1000 * 4
    assert moment_bytes(1000, 1, "fisher") == 1000 * 4
    assert moment_bytes(1001, 2, "s") == 2 * 501 * 4
    assert moment_bytes(1000, 4, "s", accumulate="bfloat16", largest=10) == 2 * (250 * 2 + 10 * 4)
    assert moment_bytes(1000, 4, "s", sharded=False) == moment_bytes(1000, 1, "s")
    model = tiny_llama(torch.float32)
    work = {}
    estimate(model, make_batches(), "s", work=work)
    n = sum(p.numel() for _, p in __import__("piece_cl.importance", fromlist=["x"]).eligible_parameters(model))
    assert work["moment_bytes"] == moment_bytes(n, 1, "s")


def test_select_top_k_still_takes_plain_dicts():
    scores = {"a": torch.tensor([0.0, 3.0, 1.0]), "b": torch.tensor([3.0, 2.0])}
    assert {n: i.tolist() for n, i in select_top_k(scores, 0.6).items()} == {"a": [1], "b": [0, 1]}
