"""A tiny Llama, a tiny tokenizer and run.py's stage functions without evaluation, for the methods' property tests."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from piece_cl.benchmarks.registry import Task
from piece_cl.methods.base import StageContext, build_method
from piece_cl.models.tiny import build_tokenizer
from piece_cl.run import stage_context, train_stage
from piece_cl.training.engine import TorchEngine

WORDS = "alpha beta gamma delta red green blue one two three yes no".split()


def records(task: str, n: int, answer_len: int = 2) -> list[dict]:
    """Distinct deterministic records; the answer depends on the prompt so there is something to learn."""
    return [{"prompt": f"{task} {WORDS[i % len(WORDS)]} {i} ?", "answer": " ".join(WORDS[(i + j) % 5] for j in range(answer_len))}
            for i in range(n)]


def task(name: str, n: int = 8) -> Task:
    return Task(name=name, metric="choice", train=records(name, n), eval=[], test=[])


@functools.lru_cache(maxsize=1)
def tokenizer():
    return build_tokenizer([r["prompt"] + " " + r["answer"] for r in records("task", 40)], vocab_size=300)


def model(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    tok = tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def config(**trainer):
    settings = dict(engine="torch", device="cpu", epochs=1, batch_size=4, micro_batch_size=2, grad_clip=1.0,
                    max_prompt_len=32, max_answer_len=8, shuffle=True)
    settings.update(trainer)
    return OmegaConf.create({"seed": 7, "trainer": settings})


def method(name: str, protocol: str = "paper", **overrides):
    """The method as configured in configs/method/<name>.yaml under `protocol`, with `overrides`."""
    from tests.conftest import compose_config

    cfg = compose_config([f"method={name}", f"protocol={protocol}"] + [f"method.{k}={v}" for k, v in overrides.items()])
    node = OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True))
    return build_method(node)


def optimizer_factory(lr: float = 1e-2, weight_decay: float = 0.0):
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


class Runner:
    """run.py's stages without evaluation: setup once, then `train_stage` (before_task -> fit -> after_task)."""

    def __init__(self, method, net, tmp_path: Path, factory=None, **trainer):
        self.method = method
        self.cfg = config(**trainer)
        self.engine = TorchEngine(self.cfg.trainer, method.setup(net), tokenizer())
        self.factory = factory or optimizer_factory()
        self.tmp_path = Path(tmp_path)
        self.fitted: list[list[dict]] = []  # records of every fit call, in order
        fit = self.engine.fit

        def recording_fit(ctx, method, records, *args, **kwargs):
            self.fitted.append(list(records))
            return fit(ctx, method, records, *args, **kwargs)

        self.engine.fit = recording_fit

    def context(self, t: int, tasks: list[Task]) -> StageContext:
        return stage_context(self.cfg, t, tasks, self.engine, self.method, self.factory, self.tmp_path / f"stage_{t}",
                             log=lambda m: None)

    def stage(self, t: int, tasks: list[Task], **hooks) -> StageContext:
        """One stage through run.train_stage; `hooks`: its before_fit / after_fit / on_step."""
        ctx = self.context(t, tasks)
        train_stage(ctx, self.method, self.factory, **hooks)
        return ctx


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}
