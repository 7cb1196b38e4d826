"""The one loop (ARCHITECTURE.md): learn the tasks in sequence, fill the R matrix, save every stage.

    load model, benchmark, method
    for t, task in enumerate(tasks):
        method.before_task -> engine.fit -> method.after_task
        evaluate R[t, :t+1] and the probe; save stage t atomically
"""
from __future__ import annotations

import random
from pathlib import Path

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
from piece_cl.progress import console
from piece_cl.results import RunResults, load_results
from piece_cl.tracking import build_tracker
from piece_cl.training.engine import build_engine
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


def run(cfg, run_dir: Path) -> RunResults:
    seed_everything(int(cfg.seed))
    method = build_method(cfg.method)  # first: an unknown method or missing weights fail before any loading
    check_available(cfg.model)
    benchmark = build_benchmark(cfg)
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
        stage_dir = run_dir / f"stage_{t}_{task.name}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(t=t, task=task, tasks_seen=benchmark.tasks[: t + 1], model=engine.model,
                           tokenizer=tokenizer, engine=engine, cfg=cfg, stage_dir=stage_dir,
                           seed=int(cfg.seed), log=console.print)
        ctx.fit = lambda records, epochs=None, _ctx=ctx: engine.fit(
            _ctx, method, records, int(epochs or cfg.trainer.epochs), optimizer_factory, description="extra",
            on_step=lambda step, _t=_ctx.t: tracker.active and tracker.on_step(step, _t, engine.step_stats,
                                                                                  method.step_scalars()))

        method.before_task(ctx)
        curves.start_stage(t, stage_dir)

        def on_step(step: int, _t=t) -> None:
            heldout = curves.on_step(step)
            if tracker.active:
                tracker.on_step(step, _t, engine.step_stats, method.step_scalars(), heldout)
            maybe_kill("step", _t)

        stats = engine.fit(ctx, method, method.train_records(ctx), int(cfg.trainer.epochs), optimizer_factory,
                           on_step=on_step, description=f"task {t + 1}/{len(benchmark.tasks)}",
                           epoch_dir=epoch_checkpoint(run_dir, t) if cfg.trainer.epoch_checkpoints else None)
        method.after_task(ctx)

        model_for_eval = method.eval_model(engine.model)
        row, probe_score, metrics, predictions = evaluate_stage(model_for_eval, tokenizer, benchmark.tasks[: t + 1],
                                                                probe, cfg.eval, t)
        metrics["train"] = stats

        # Every rank trained the same stage and holds the gathered evaluation (the model is whole between
        # fits); rank 0 writes.
        if engine.is_main:
            write_jsonl(stage_dir / "predictions.jsonl", predictions)
            atomic_write_json(stage_dir / "metrics.json", metrics)
            if cfg.save_checkpoints:
                model_for_eval.save_pretrained(stage_dir / "checkpoint")
                tokenizer.save_pretrained(stage_dir / "checkpoint")
            save_stage_state(run_dir, t, engine.model, method, engine)
        maybe_kill("commit", t)
        results.add_stage(row, probe_score)
        tracker.on_stage(t, engine.global_step, results, method.stage_scalars())  # flushed before the commit
        if engine.is_main:
            results.save(run_dir)  # the commit: results.json names the stages that are complete
            prune_checkpoints(run_dir, keep=t)
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
