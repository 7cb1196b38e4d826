"""importance.estimate against a brute-force float64 batch-1 reference; select_top_k against concatenate-and-sort."""
import math
from decimal import Decimal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from piece_cl.errors import PieceError
from piece_cl.importance import DEFAULT_XI, eligible_parameters, estimate, select_top_k


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine spinning threads slow them down."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_llama(dtype=torch.float64, tie=False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tie, attention_bias=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norm weights so their per-sample gradients differ from ones-init
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype)


def make_batches(n_batches=3, rows=4, seed=1) -> list[dict]:
    """Right-padded batches, labels -100 on prompt and padding, varied prompt/answer lengths."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = [(int(torch.randint(2, 7, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen))) for _ in range(rows)]
        width = max(p + a for p, a in lengths) + 2
        ids = torch.zeros(rows, width, dtype=torch.long)
        labels = torch.full((rows, width), -100)
        mask = torch.zeros(rows, width, dtype=torch.long)
        for r, (p, a) in enumerate(lengths):
            ids[r, : p + a] = torch.randint(1, 100, (p + a,), generator=gen)
            labels[r, p : p + a] = ids[r, p : p + a]
            mask[r, : p + a] = 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return batches


def reference_gradients(model, batches, per_sample: bool, reduction: str) -> dict[str, torch.Tensor]:
    """Stacked gradients of -log-likelihood: one autograd call per sample (unpadded) or per batch."""
    params = eligible_parameters(model)
    units = []
    for batch in batches:
        if per_sample:
            for r in range(batch["input_ids"].shape[0]):
                length = int(batch["attention_mask"][r].sum())
                units.append({k: v[r : r + 1, :length] for k, v in batch.items()})
        else:
            units.append(batch)
    stacked = {name: [] for name, _ in params}
    for unit in units:
        out = model(**unit)  # transformers' token-mean cross-entropy over answer tokens
        count = (unit["labels"][:, 1:] != -100).sum()
        loss = out.loss * count if reduction == "sum" else out.loss
        grads = torch.autograd.grad(loss, [p for _, p in params])
        for (name, _), g in zip(params, grads):
            stacked[name].append(g.double())
    return {name: torch.stack(gs) for name, gs in stacked.items()}


def fisher_of(g):
    return (g**2).mean(0)


def s_of(g, xi):
    return g.mean(0).abs() / torch.sqrt((g**2).mean(0) + xi)


def assert_close_relative(got: dict, want: dict, tol: float):
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == torch.float32 and got[name].shape == want[name].shape
        scale = want[name].abs().max()
        assert scale > 0, name
        err = ((got[name].double() - want[name]).abs().max() / scale).item()
        assert err <= tol, (name, err)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def batches():
    return make_batches()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_sample_fisher_and_s_match_batch1_reference(model, batches, reduction):
    g = reference_gradients(model, batches, per_sample=True, reduction=reduction)
    fisher = estimate(model, batches, "fisher", chunk_size=3, reduction=reduction)
    assert_close_relative(fisher, {n: fisher_of(v) for n, v in g.items()}, 1e-6)
    s = estimate(model, batches, "s", chunk_size=5, reduction=reduction)
    assert_close_relative(s, {n: s_of(v, DEFAULT_XI) for n, v in g.items()}, 1e-6)


def test_batch_granularity_matches_minibatch_reference_with_xi_on_sums(model, batches):
    g = reference_gradients(model, batches, per_sample=False, reduction="mean")
    fisher = estimate(model, batches, "fisher", granularity="batch", reduction="mean")
    assert_close_relative(fisher, {n: fisher_of(v) for n, v in g.items()}, 1e-6)
    s = estimate(model, batches, "s", granularity="batch", reduction="mean", xi=1.0, xi_on_sums=True)
    want = {n: v.sum(0).abs() / torch.sqrt((v**2).sum(0) + 1.0) for n, v in g.items()}
    assert_close_relative(s, want, 1e-6)


def test_float32_model_close_to_float64_reference_and_state_untouched(batches):
    model32 = tiny_llama(torch.float32)
    model32.train()
    flags = {n: p.requires_grad for n, p in model32.named_parameters()}
    model32.model.norm.weight.requires_grad_(False)  # a frozen eligible parameter is still scored
    flags["model.norm.weight"] = False
    s = estimate(model32, batches, "s", chunk_size=4)
    assert model32.training
    assert {n: p.requires_grad for n, p in model32.named_parameters()} == flags
    assert all(p.grad is None for p in model32.parameters())
    g = reference_gradients(tiny_llama(), batches, per_sample=True, reduction="sum")
    assert_close_relative(s, {n: s_of(v, DEFAULT_XI) for n, v in g.items()}, 1e-4)


def test_attention_mask_and_chunking_do_not_change_scores(model, batches):
    unmasked = [{k: v for k, v in b.items() if k != "attention_mask"} for b in batches]
    a = estimate(model, batches, "fisher", chunk_size=1)
    b = estimate(model, unmasked, "fisher", chunk_size=8)
    assert_close_relative(a, {n: t.double() for n, t in b.items()}, 1e-9)


def test_eligible_defaults_and_errors(model, batches):
    names = [n for n, _ in eligible_parameters(model)]
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert not any("embed_tokens" in n for n in names)
    assert [n for n, _ in eligible_parameters(model, include=[r"mlp\."])] == [n for n in names if ".mlp." in n]
    tied = tiny_llama(tie=True)
    assert "lm_head.weight" not in [n for n, _ in eligible_parameters(tied)]
    with pytest.raises(PieceError, match="shared"):
        estimate(tied, batches, "fisher", eligible=eligible_parameters(tied, exclude=()))
    with pytest.raises(PieceError, match="kind"):
        estimate(model, batches, "grad")
    with pytest.raises(PieceError, match="xi"):
        estimate(model, batches, "s", xi=0.0)
    with pytest.raises(PieceError, match="at least one sample"):
        estimate(model, [], "s")


def concat_reference(scores: dict, k: int) -> dict:
    """Concatenate in sorted name order, stable descending sort: ties go to the smallest (name, index)."""
    names = sorted(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        mine = order[(order >= offset) & (order < offset + size)] - offset
        if mine.numel():
            out[n] = mine.sort().values
        offset += size
    return out


def assert_same_selection(got: dict, want: dict):
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == torch.int64 and torch.equal(got[n], want[n]), n


score_dicts = st.dictionaries(
    st.text(alphabet="abcxyz.", min_size=1, max_size=6),
    st.lists(st.sampled_from([0.0, -0.0, 1e-30, 0.5, 0.5, 1.0, 2.0, 3.5, float("inf")]) | st.floats(0, 10, width=32), min_size=1, max_size=40),
    min_size=1, max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(score_dicts, st.floats(1e-3, 1.0))
def test_select_top_k_equals_concatenate_and_sort(raw, ratio):
    scores = {n: torch.tensor(v, dtype=torch.float32) for n, v in raw.items()}
    entries = sum(t.numel() for t in scores.values())
    k = math.floor(Decimal(repr(ratio)) * entries)
    if k == 0:
        with pytest.raises(PieceError):
            select_top_k(scores, ratio)
        return
    got = select_top_k(scores, ratio)
    assert sum(t.numel() for t in got.values()) == k
    assert_same_selection(got, concat_reference(scores, k))
    assert_same_selection(select_top_k(dict(reversed(list(scores.items()))), ratio), got)


def test_select_top_k_blocks_shapes_total_and_errors(monkeypatch):
    import piece_cl.importance as importance

    monkeypatch.setattr(importance, "_BLOCK", 7)  # many blocks per tensor, threshold ties across blocks
    gen = torch.Generator().manual_seed(3)
    scores = {f"t{i}": torch.randint(0, 5, (4, 9), generator=gen).float() for i in range(6)}
    got = select_top_k(scores, 0.29)
    assert sum(t.numel() for t in got.values()) == 62
    assert_same_selection(got, concat_reference(scores, 62))
    assert sum(t.numel() for t in select_top_k(scores, 0.29, total=100).values()) == 29  # 0.29 * 100 < 29 in floats
    assert sum(t.numel() for t in select_top_k(scores, 0.01, total=1000).values()) == 10
    with pytest.raises(PieceError, match="selects nothing"):
        select_top_k(scores, 0.001)
    with pytest.raises(PieceError, match="only 216"):
        select_top_k(scores, 0.5, total=1000)
    with pytest.raises(PieceError, match="non-negative"):
        select_top_k({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(PieceError, match="float32"):
        select_top_k({"a": torch.ones(3, dtype=torch.float64)}, 0.5)
