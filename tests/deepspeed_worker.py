"""Two short stages of one method on a tiny Llama, with any engine; rank 0 saves the weights and losses.

    python tests/deepspeed_worker.py OUT.pt trainer=torch method=seqft                      # reference
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/deepspeed_worker.py OUT.pt \
        trainer=deepspeed trainer.zero_stage=2 method=seqft

Used by tests/test_deepspeed.py and scripts/bench_deepspeed.py; the extra arguments are config overrides.
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

from piece_cl.cli import CONFIG_DIR
from piece_cl.data import tiny_tasks
from piece_cl.methods.base import StageContext, build_method
from piece_cl.models.tiny import build_tiny_model, build_tokenizer
from piece_cl.training.engine import build_engine

TASKS = ("tiny_choice", "tiny_number")
BASE = ["trainer.micro_batch_size=2", "model.batch_size=8", "model.epochs=1", "trainer.shuffle=true",
        "model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2",
        "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=2", "model.lr=1e-3"]


def main(out: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=BASE + overrides)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(tiny_tasks.tokenizer_corpus(50), 300)
    model = build_tiny_model(dict(cfg.model.arch), tokenizer)
    method = build_method(cfg.method)
    model = method.setup(model)
    engine = build_engine(cfg, model, tokenizer)
    factory = instantiate(cfg.optimizer)
    tasks = [tiny_tasks.build_task(name, 24, 4, 4, seed=0) for name in TASKS]
    before = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    stats, masks, fit_seconds = [], [], 0.0
    with tempfile.TemporaryDirectory() as scratch:
        for t, task in enumerate(tasks):
            stage_dir = Path(scratch) / f"rank{engine.rank}_stage{t}"
            stage_dir.mkdir()
            ctx = StageContext(t=t, task=task, tasks_seen=tasks[: t + 1], model=engine.model, tokenizer=tokenizer,
                               engine=engine, cfg=cfg, stage_dir=stage_dir, seed=0, log=lambda *_: None)
            ctx.fit = lambda records, epochs=None, _ctx=ctx: engine.fit(_ctx, method, records, epochs or 1, factory)
            method.before_task(ctx)
            masks.append({k: v.clone() for k, v in getattr(method, "masks", {}).items()})  # PIECE's selections
            started = time.perf_counter()
            stats.append(engine.fit(ctx, method, method.train_records(ctx), int(cfg.trainer.epochs), factory))
            fit_seconds += time.perf_counter() - started
            method.after_task(ctx)
    if engine.is_main:
        torch.save({"before": before, "after": {k: v.detach().clone() for k, v in engine.model.state_dict().items()},
                    "stats": stats, "masks": masks, "world_size": engine.world_size, "fit_seconds": fit_seconds,
                    "steps": sum(s["steps"] for s in stats),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, out)
    if cfg.trainer.engine == "deepspeed":
        from piece_cl.training.deepspeed_engine import close_distributed

        close_distributed()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1], sys.argv[2:])
    print(json.dumps({"ok": True}))
