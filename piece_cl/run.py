"""The one loop (ARCHITECTURE.md): learn the tasks in sequence, fill the R matrix, save every stage.

    load model, benchmark, method
    for t, task in enumerate(tasks):
        ctx = stage_context(...)                                         # what the method sees
        train_stage(ctx, ...):  method.before_task -> engine.fit -> method.after_task
        commit_stage(ctx, ...): evaluate R[t, :t+1] and the probe; save stage t atomically

The three stage functions are the loop's only definition of a stage: tests/methods_kit.py,
tests/deepspeed_worker.py and scripts/bench_methods.py call them instead of copying the sequence.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate

from piece_cl.checkpoint import epoch_checkpoint, load_stage_state, prune_checkpoints, save_stage_state
from piece_cl.benchmarks.registry import build_benchmark
from piece_cl.errors import PieceError
from piece_cl.evaluation.evaluate import evaluate_task
from piece_cl.evaluation.sharding import Shard
from piece_cl.faults import maybe_kill
from piece_cl.io import atomic_write_json, write_jsonl
from piece_cl.methods.base import StageContext, build_method
from piece_cl.models.loading import check_available, load_model
from piece_cl.plan.report import warn_if_unfit
from piece_cl.progress import console
from piece_cl.results import RunResults, load_results
from piece_cl.tracking import build_tracker
from piece_cl.training.build import build_engine
from piece_cl.training.loss_curves import LossCurves


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate_stage(model, tokenizer, seen_tasks, probe, eval_cfg, t: int):
    """Row t of the R matrix (every task seen so far) and the probe, with metrics and predictions.

    Each rank generates its share (evaluation/sharding.py); every rank returns the gathered results.
    """
    shard = Shard.current()
    row, metrics, predictions = [], {}, []
    for task in seen_tasks:
        score, task_metrics, items = evaluate_task(model, tokenizer, task, eval_cfg, shard)
        row.append(score)
        metrics[task.name] = task_metrics
        predictions.extend(items)
        maybe_kill("eval", t)
    probe_score = None
    if probe is not None:
        probe_score, probe_items = probe.evaluate(model, tokenizer, eval_cfg, shard)
        metrics["probe"] = {probe.name: probe_score}
        predictions.extend({"task": probe.name, **item} for item in probe_items)
    metrics["evaluation"] = {"prompts_per_rank": shard.work_per_rank()}
    return row, probe_score, metrics, predictions


def stage_context(cfg, t: int, tasks: list, engine, method, optimizer_factory, stage_dir: Path,
                  log: Callable[[str], None] = console.print,
                  on_extra_step: Callable[[int], None] | None = None) -> StageContext:
    """Stage t's context; `ctx.fit(records, epochs=None)` trains extra records with the same engine (Replay),
    calling `on_extra_step(global_step)` after each of its steps (tracking)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(t=t, task=tasks[t], tasks_seen=tasks[: t + 1], model=engine.model, tokenizer=engine.tokenizer,
                       engine=engine, cfg=cfg, stage_dir=stage_dir, seed=int(cfg.seed), log=log)
    ctx.fit = lambda records, epochs=None: engine.fit(
        ctx, method, records, int(epochs or cfg.trainer.epochs), optimizer_factory, description="extra",
        on_step=on_extra_step)
    return ctx


def train_stage(ctx: StageContext, method, optimizer_factory, *, on_step: Callable[[int], None] | None = None,
                description: str = "train", epoch_dir: Path | None = None,
                before_fit: Callable[[StageContext], None] | None = None,
                after_fit: Callable[[StageContext, dict], None] | None = None) -> dict:
    """before_task -> fit of the method's records for trainer.epochs -> after_task; the fit's loss statistics.

    `before_fit` / `after_fit` let a caller look at the method between its hooks (tests, benchmarks).
    """
    method.before_task(ctx)
    if before_fit is not None:
        before_fit(ctx)
    stats = ctx.engine.fit(ctx, method, method.train_records(ctx), int(ctx.cfg.trainer.epochs), optimizer_factory,
                           on_step=on_step, description=description, epoch_dir=epoch_dir)
    if after_fit is not None:
        after_fit(ctx, stats)
    method.after_task(ctx)
    return stats


def commit_stage(ctx: StageContext, method, results: RunResults, probe, stats: dict, run_dir: Path, tracker=None):
    """Evaluate row t and the probe, write the stage's files, then commit it in results.json (rank 0 writes);
    the `tracker` (piece_cl/tracking) logs the stage just before the commit.

    Every rank trained the same stage and holds the gathered evaluation (the model is whole between fits).
    Returns (row, probe score).
    """
    cfg, engine, t, stage_dir = ctx.cfg, ctx.engine, ctx.t, ctx.stage_dir
    model_for_eval = method.eval_model(engine.model)
    row, probe_score, metrics, predictions = evaluate_stage(model_for_eval, ctx.tokenizer, ctx.tasks_seen,
                                                            probe, cfg.eval, t)
    metrics["train"] = stats
    if engine.is_main:
        write_jsonl(stage_dir / "predictions.jsonl", predictions)
        atomic_write_json(stage_dir / "metrics.json", metrics)
        if cfg.save_checkpoints:
            model_for_eval.save_pretrained(stage_dir / "checkpoint")
            ctx.tokenizer.save_pretrained(stage_dir / "checkpoint")
        save_stage_state(run_dir, t, engine.model, method, engine)
    maybe_kill("commit", t)
    results.add_stage(row, probe_score)
    if tracker is not None:
        tracker.on_stage(t, engine.global_step, results, method.stage_scalars())  # flushed before the commit
    if engine.is_main:
        results.save(run_dir)  # the commit: results.json names the stages that are complete
        prune_checkpoints(run_dir, keep=t)
    return row, probe_score


def run(cfg, run_dir: Path) -> RunResults:
    seed_everything(int(cfg.seed))
    method = build_method(cfg.method)  # first: an unknown method or missing weights fail before any loading
    check_available(cfg.model)
    benchmark = build_benchmark(cfg)
    warn_if_unfit(cfg, console.print)  # the memory plan, before the weights load (plan/report.py)
    model, tokenizer = load_model(cfg)
    model = method.setup(model)
    engine = build_engine(cfg, model, tokenizer)
    optimizer_factory = instantiate(cfg.optimizer)
    probe = benchmark.probe
    results = load_results(run_dir)
    if results is not None and results.stages_done:
        load_stage_state(run_dir, results.stages_done - 1, engine.model, method, engine)
        console.print(f"resuming after stage {results.stages_done}/{len(benchmark.tasks)}")
    else:
        results = RunResults(run=cfg.run_name, model=cfg.model.name, method=cfg.method.name,
                             benchmark=benchmark.name, tasks=[t.name for t in benchmark.tasks],
                             probe_name=probe.name if probe else None)

    if probe is not None and cfg.eval.probe_before and results.probe_base is None:
        console.print(f"[bold]probe[/] {probe.name} on the base model ...")
        results.probe_base, _ = probe.evaluate(engine.model, tokenizer, cfg.eval, Shard.current())
        console.print(f"base model: {probe.name} = {results.probe_base:.2f}")

    tracker = build_tracker(cfg, run_dir, engine.is_main)  # rank 0 only; never changes what is computed
    curves = LossCurves(engine, benchmark.tasks, every=int(cfg.trainer.loss_curve_every),
                        samples=int(cfg.trainer.loss_curve_samples))
    for t, task in enumerate(benchmark.tasks):
        if t < results.stages_done:
            continue
        seed_everything(int(cfg.seed) + t)  # each stage's random streams depend only on (seed, t): resumable
        ctx = stage_context(cfg, t, benchmark.tasks, engine, method, optimizer_factory,
                            run_dir / f"stage_{t}_{task.name}",
                            on_extra_step=lambda step, _t=t: tracker.active and tracker.on_step(
                                step, _t, engine.step_stats, method.step_scalars()))
        curves.start_stage(t, ctx.stage_dir)

        def on_step(step: int, _t=t) -> None:
            heldout = curves.on_step(step)
            if tracker.active:
                tracker.on_step(step, _t, engine.step_stats, method.step_scalars(), heldout)
            maybe_kill("step", _t)

        stats = train_stage(ctx, method, optimizer_factory, on_step=on_step,
                            description=f"task {t + 1}/{len(benchmark.tasks)}",
                            epoch_dir=epoch_checkpoint(run_dir, t) if cfg.trainer.epoch_checkpoints else None)
        row, probe_score = commit_stage(ctx, method, results, probe, stats, run_dir, tracker)
        summary = results.to_dict()
        console.print(f"stage {t + 1}/{len(benchmark.tasks)} {task.name}: score {row[-1]:.2f}  "
                      f"OP {summary['OP'][-1]:.2f}  BWT {summary['BWT'][-1]:.2f}"
                      + (f"  {probe.name} {probe_score:.2f}" if probe is not None else "")
                      + f"  (loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f})")

    if not results.finished:
        raise PieceError("the run ended before its last stage")
    tracker.on_end(results, cfg, engine.global_step)
    tracker.close()
    return results
