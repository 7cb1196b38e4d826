"""Two short stages of each given method on a tiny Llama, with any engine; rank 0 saves what happened.

    python tests/deepspeed_worker.py OUT.pt seqft,ewc trainer=torch                                 # reference
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/deepspeed_worker.py OUT.pt \
        seqft,ewc trainer=deepspeed trainer.zero_stage=2

Several methods share one process group (one launch, one DeepSpeed import), each with a fresh model.
OUT.pt holds {method: record}: weights before/after, loss statistics, PIECE/MIGU masks, and `evidence`
that the method's mechanism acted *through the engine* (read back through `engine.get_grad` after the
method edited a gradient, penalties measured on the trained model). Used by tests/test_deepspeed.py and
scripts/bench_deepspeed.py; the arguments after the methods are config overrides.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file

from piece_cl.cli import CONFIG_DIR
from piece_cl.benchmarks.tiny import build_task
from piece_cl.data import tiny_tasks
from piece_cl.methods.base import build_method
from piece_cl.models.tiny import build_tiny_model, build_tokenizer
from piece_cl.run import stage_context, train_stage
from piece_cl.training.build import build_engine

TASKS = ("tiny_choice", "tiny_number")
BASE = ["seed=0", "trainer.micro_batch_size=2", "model.batch_size=8", "model.epochs=1", "trainer.shuffle=true",
        "model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2",
        "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=2", "model.lr=1e-3"]
# MIGU's 0.1% of ~900 rows of this model is no row at all
# and LoRA dropout draws other masks on 2 ranks than in 1 process: off, so the runs can be compared.
# GEM needs a conflict to project anything: 3 epochs at lr 1e-2 give the second task some (measured: 3 of 9 steps).
TINY_MODEL_SETTINGS = {"migu": ["method.ratio=0.1"], "gem": ["trainer.epochs=3", "model.lr=1e-2"], "seqlora": ["method.dropout=0"], "olora": ["method.dropout=0"]}


def watch_gem(method, evidence: dict) -> None:
    """After each projected GEM step: cos(g̃, g_k) of the gradient the engine now holds, for every memory (≥ 0)."""
    original = method.after_backward

    def after_backward(ctx) -> None:
        before = method.projections
        original(ctx)
        if method.projections == before:
            return
        params = method.trainable(ctx.model)
        held = [ctx.engine.get_grad(n, p) for n, p in params]
        g_norm = sum(float(g.double().pow(2).sum()) for g in held if g is not None) ** 0.5
        cosines = []
        for memory in method.memories:
            reference = method._reference_gradient(ctx, params, memory)
            dot = sum(float((g.double() * r.double()).sum()) for g, r in zip(held, reference) if g is not None)
            cosines.append(dot / (g_norm * sum(float(r.double().pow(2).sum()) for r in reference) ** 0.5))
        evidence.setdefault("projected_cosines", []).append(cosines)

    method.after_backward = after_backward


def stage_evidence(name: str, method, ctx) -> dict:
    """What shows the method acted, measured on the model as training left it (whole on every rank)."""
    model = ctx.model
    if name == "ewc" and ctx.t == 1:  # before after_task moves the anchor to these weights
        return {"penalty": float(method.penalty(model).detach())}
    if name == "lwf" and ctx.t == 1:  # the teacher is the model before this task: it must disagree by now
        from piece_cl.methods.lwf import distillation_loss

        batch = ctx.engine.batch(ctx.engine.encode(ctx.task.train[:4]))
        with torch.no_grad():
            student, teacher = model(**batch).logits, method.teacher(**batch).logits
        return {"distillation": float(distillation_loss(student, teacher, batch["labels"], 1.0))}
    if name == "olora":
        return {"adapters": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}}
    if name == "migu":
        return {"masks": load_file(ctx.stage_dir / "mask.safetensors")} if ctx.engine.is_main else {}
    return {}


def run_method(name: str, cfg, tokenizer, factory, scratch: Path) -> dict:
    torch.manual_seed(0)
    model = build_tiny_model(dict(cfg.model.arch), tokenizer)
    method = build_method(cfg.method)
    model = method.setup(model)
    engine = build_engine(cfg, model, tokenizer)
    evidence: dict = {}
    if name == "gem":
        watch_gem(method, evidence)
    tasks = [build_task(task, 24, 4, 4, seed=0) for task in TASKS]
    before = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    stats, masks, stages, fit_seconds, step_seconds = [], [], [], 0.0, []
    for t, task in enumerate(tasks):
        ctx = stage_context(cfg, t, tasks, engine, method, factory, scratch / f"{name}_rank{engine.rank}_stage{t}",
                            log=lambda *_: None)
        clock = started = 0.0
        first = engine.global_step + 1

        def before_fit(ctx) -> None:
            nonlocal clock, started
            masks.append({k: v.clone() for k, v in getattr(method, "masks", {}).items()})  # PIECE's selections
            started = clock = time.perf_counter()

        def on_step(step: int) -> None:
            nonlocal clock
            if step > first:  # the first step of a fit also pays for wrapping the model (deepspeed.initialize)
                step_seconds.append(time.perf_counter() - clock)
            clock = time.perf_counter()

        def after_fit(ctx, fit_stats: dict) -> None:  # before after_task moves EWC's anchor, drops LwF's teacher
            nonlocal fit_seconds
            stats.append({**fit_stats, "records": len(method.train_records(ctx))})
            fit_seconds += time.perf_counter() - started
            stages.append(stage_evidence(name, method, ctx))

        train_stage(ctx, method, factory, on_step=on_step, before_fit=before_fit, after_fit=after_fit)
    evidence.update(gem_projections=getattr(method, "projections", None), global_step=engine.global_step)
    return {"before": before, "after": {k: v.detach().clone() for k, v in engine.model.state_dict().items()},
            "stats": stats, "masks": masks, "stages": stages, "evidence": evidence, "world_size": engine.world_size,
            "fit_seconds": fit_seconds, "step_seconds": step_seconds, "steps": sum(s["steps"] for s in stats),
            "peak_rss_mb": peak_rss_mb_per_rank()}


def peak_rss_mb_per_rank() -> list[float]:
    """This process's peak resident memory so far, from every rank (rank order)."""
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not torch.distributed.is_initialized():
        return [mine]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def main(out: str, methods: list[str], overrides: list[str]) -> None:
    tokenizer = build_tokenizer(tiny_tasks.tokenizer_corpus(50), 300)
    results, engine_name, rank = {}, None, 0
    with tempfile.TemporaryDirectory() as scratch:
        for name in methods:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[*BASE, f"method={name}", *TINY_MODEL_SETTINGS.get(name, []), *overrides])
            engine_name = cfg.trainer.engine
            results[name] = run_method(name, cfg, tokenizer, instantiate(cfg.optimizer), Path(scratch))
            rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        torch.save(results, out)
    if engine_name == "deepspeed":
        from piece_cl.training.deepspeed_engine import close_distributed

        close_distributed()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1], sys.argv[2].split(","), sys.argv[3:])
    print(json.dumps({"ok": True}))
