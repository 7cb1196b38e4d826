"""PIECE training with the mask: entries outside the mask keep their exact bits, Adam state is O(k),
and the sparse optimiser is torch's AdamW restricted to the selected entries."""
import copy
import logging
import random

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import compose_config
from piece_cl.benchmarks.registry import Task
from piece_cl.methods.base import StageContext, build_method
from piece_cl.training.engine import TorchEngine
from piece_cl.training.sparse import AdamSettings, SparseMaskedAdam

ALPHABET = "abcdefghijklmnopqrstuvwxyz 0123456789"


class CharTokenizer:
    """Offline character tokenizer: 0 pad, 1 bos, 2 eos, then one id per character."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ALPHABET.index(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def make_task(name, seed, n=16):
    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice(ALPHABET[:26]) for _ in range(k))  # noqa: E731
    records = [{"prompt": f"{word(6)} {seed} {word(rng.randint(3, 9))}", "answer": word(rng.randint(2, 5))}
               for _ in range(n)]
    return Task(name=name, metric="choice", train=records, eval=records[:4], test=records[:4])


def compose_cfg(overrides, method="piece_s"):
    base = [f"method={method}", "trainer.device=cpu", "trainer.batch_size=8", "trainer.micro_batch_size=4",
            "trainer.max_prompt_len=32", "trainer.max_answer_len=8", "model.epochs=1", "method.lr=1e-2",
            "method.ratio=0.01", "method.importance.samples=12"]
    return compose_config(base + overrides)


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=3 + len(ALPHABET), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).to(dtype)


class Run:
    """The loop of run.py reduced to training: before_task -> fit -> after_task per stage."""

    def __init__(self, tmp_path, overrides=(), dtype=torch.float32, method="piece_s"):
        self.cfg = compose_cfg(list(overrides), method)
        self.method = build_method(self.cfg.method)
        self.model = self.method.setup(tiny_llama(dtype))
        self.engine = TorchEngine(self.cfg.trainer, self.model, CharTokenizer())
        self.factory = instantiate(self.cfg.optimizer)
        self.tmp_path = tmp_path
        self.logs: list[str] = []

    def context(self, t, task):
        stage_dir = self.tmp_path / f"stage_{t}_{task.name}"
        stage_dir.mkdir(exist_ok=True)
        return StageContext(t=t, task=task, tasks_seen=[task], model=self.model, tokenizer=self.engine.tokenizer,
                            engine=self.engine, cfg=self.cfg, stage_dir=stage_dir, seed=0, log=self.logs.append)

    def stage(self, t, task, during_fit=None):
        ctx = self.context(t, task)
        self.method.before_task(ctx)
        if during_fit is not None:
            self.method.after_backward = lambda _ctx: during_fit(self)
        self.engine.fit(ctx, self.method, self.method.train_records(ctx), int(self.cfg.trainer.epochs), self.factory)
        self.method.after_task(ctx)
        return ctx


def bits(tensor):
    """Integer view of a tensor's bit patterns, so that equality means bit-identical (also -0.0, NaN)."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[tensor.dtype]
    return tensor.detach().reshape(-1).view(view).clone()


def outside(flat, mask_indices):
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if mask_indices is not None:
        keep[mask_indices] = False
    return flat[keep]


def assert_only_mask_moved(before, model, masks):
    k = sum(m.numel() for m in masks.values())
    changed = 0
    for name, param in model.named_parameters():
        old, new = before[name], bits(param)
        assert torch.equal(outside(old, masks.get(name)), outside(new, masks.get(name))), f"{name} moved outside its mask"
        changed += int((old != new).sum())
    assert 0 < changed <= k
    return changed


def no_dense_gradients(run):
    """Called after each backward: hooks have consumed every gradient, none is kept per parameter."""
    held = [n for n, p in run.model.named_parameters() if p.grad is not None]
    assert not held, f"dense gradients kept for {held[:3]}"


@pytest.mark.parametrize("method,overrides", [("piece_s", ["optimizer.weight_decay=0.1", "optimizer.eps=1e-3"]),
                                              ("piece_f", ["method.fast_linear=false"])],
                         ids=["piece_s_fast_linear_weight_decay", "piece_f_hooks"])
def test_every_stage_changes_only_its_mask(tmp_path, method, overrides):
    run = Run(tmp_path, overrides, method=method)
    total = sum(p.numel() for p in run.model.parameters())
    for t in range(2):
        task = make_task(f"task{t}", seed=t)
        before = {n: bits(p) for n, p in run.model.named_parameters()}
        ctx = run.stage(t, task, during_fit=no_dense_gradients)
        masks = run.method.masks
        assert sum(m.numel() for m in masks.values()) == int(0.01 * total)
        assert_only_mask_moved(before, run.model, masks)
        saved = load_file(str(ctx.stage_dir / "mask.safetensors"))
        assert saved.keys() == masks.keys() and all(torch.equal(saved[n], masks[n]) for n in masks)
        assert all(torch.equal(m, m.sort().values) and m.dtype == torch.int64 for m in masks.values())
        assert not any(p.requires_grad for n, p in run.model.named_parameters() if n not in masks)
        assert "embed_tokens" not in " ".join(masks)
        assert any("tensors hold selections" in line for line in run.logs)
    # patches are gone after the task: the model is a plain transformers model again
    assert all("forward" not in vars(m) for m in run.model.modules())


def test_optimizer_state_is_order_k(tmp_path):
    run = Run(tmp_path)
    ctx = run.context(0, make_task("a", 0))
    run.method.before_task(ctx)
    optimizer = run.method.build_optimizer(ctx, run.method.trainable(run.model), run.factory)
    k = sum(m.numel() for m in run.method.masks.values())
    state = optimizer.state_tensors()
    assert optimizer.dense is None and optimizer.master is None  # fp32 weights: no master copy
    assert all(state[key].numel() == k for key in ("grad", "exp_avg", "exp_avg_sq"))
    assert sum(t.numel() for key, t in state.items() if key.startswith("anchor:")) <= k
    assert sum(t.numel() for t in state.values()) <= 4 * k < sum(p.numel() for p in run.model.parameters()) // 20
    run.method.after_task(ctx)


def test_bf16_weights_keep_an_fp32_master_of_k_entries_only(tmp_path):
    run = Run(tmp_path, dtype=torch.bfloat16)
    before = {n: bits(p) for n, p in run.model.named_parameters()}
    seen = {}

    def record_master(r):
        seen["master"] = r.method.optimizer.master

    run.stage(0, make_task("a", 0), during_fit=record_master)
    masks = run.method.masks
    assert seen["master"].dtype == torch.float32 and seen["master"].numel() == sum(m.numel() for m in masks.values())
    assert_only_mask_moved(before, run.model, masks)


@pytest.mark.parametrize("fast_linear", [True, False], ids=["fast_linear", "hooks"])
def test_sparse_adam_equals_torch_adamw_on_the_selected_entries(fast_linear):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    masks = {}
    for name, param in model.named_parameters():
        if "embed_tokens" not in name:
            masks[name] = torch.randperm(param.numel(), generator=generator)[: max(1, param.numel() // 50)].sort().values
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    for name, param in model.named_parameters():
        param.requires_grad_(name in masks)
    sparse = SparseMaskedAdam(model, masks, AdamSettings(**hyper), fast_linear=fast_linear)
    dense_params = [p for n, p in reference.named_parameters() if n in masks]
    dense = torch.optim.AdamW(dense_params, **hyper)
    selected = {n: torch.zeros(p.numel(), dtype=torch.bool).index_fill_(0, masks[n], True).view_as(p)
                for n, p in reference.named_parameters() if n in masks}
    for n, p in reference.named_parameters():
        p.requires_grad_(n in masks)
    for step in range(4):
        ids = torch.randint(3, 30, (4, 12), generator=generator)
        for net in (model, reference):
            for half in (ids[:2], ids[2:]):  # two micro-batches accumulate
                (net(input_ids=half, labels=half).loss / 2).backward()
        for n, p in reference.named_parameters():
            if n in masks:
                p.grad.mul_(selected[n])
        norm = torch.nn.utils.clip_grad_norm_(dense_params, 0.5)
        assert torch.allclose(sparse.clip_grad_norm_(0.5), norm, rtol=1e-5)
        sparse.step(), dense.step()
        sparse.zero_grad(), dense.zero_grad()
        with torch.no_grad():  # dense AdamW decays every entry: put the unselected ones back
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                if name in masks:
                    q.copy_(torch.where(selected[name], q, p))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name in masks:
            assert torch.allclose(p.reshape(-1)[masks[name]], q.detach().reshape(-1)[masks[name]], rtol=0, atol=1e-6), name
    sparse.close()


def test_unselected_train_reproduces_the_authors_bug_and_warns(tmp_path, caplog):
    run = Run(tmp_path, ["method.unselected=train", "method.ratio=0.001"])
    before = {n: bits(p) for n, p in run.model.named_parameters()}
    with caplog.at_level(logging.WARNING):
        run.stage(0, make_task("a", 0))
    fully = run.method.fully_trained
    assert fully, "the test needs eligible tensors without selections"
    assert any("authors' bug" in r.getMessage() for r in caplog.records)
    assert any("authors' bug" in line for line in run.logs)
    params = dict(run.model.named_parameters())
    for name in fully:
        assert (before[name] != bits(params[name])).float().mean() > 0.5, f"{name} should train fully under the bug"
    assert "embed_tokens" not in " ".join(fully)


def test_state_dict_round_trips_the_masks(tmp_path):
    run = Run(tmp_path)
    run.method.before_task(run.context(0, make_task("a", 0)))
    other = build_method(run.cfg.method)
    other.load_state_dict(run.method.state_dict())
    assert other.masks.keys() == run.method.masks.keys()
    assert all(torch.equal(other.masks[n], run.method.masks[n]) for n in other.masks)
