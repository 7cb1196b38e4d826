"""VQA v2 split by question type (VQACL: action, commonsense, count), Flickr30K captioning as the probe.

Records and their images are read by data/vqa.py; this module names the tasks, their metric and
generation budget, and builds the caption probe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from piece_cl.benchmarks.registry import Benchmark, Task, benchmark_seed, cfg_get, register_benchmark, resolve_root
from piece_cl.data.records import find_split_file, held_out_sample, load_records
from piece_cl.data.vqa import FLICKR_IMAGE_FOLDERS, ImageResolver, karpathy_test_records, load_flickr30k, with_images
from piece_cl.errors import PieceError
from piece_cl.evaluation.caption_probe import CaptionProbe

VQA_TASKS = ["action", "commonsense", "count"]
VQA_MAX_NEW_TOKENS = 16
MISSING_POLICIES = ("error", "skip")


def load_vqa_task(root: Path, name: str, resolver: ImageResolver, benchmark_cfg: Any = None, seed: int = 42) -> Task:
    if name not in VQA_TASKS:
        raise PieceError(f"unknown VQA task '{name}'; known: {', '.join(VQA_TASKS)}")
    task_dir = root / name
    if not task_dir.is_dir():
        raise PieceError(f"VQA task directory {task_dir} not found under paths.vqa_root")
    required = ("prompt", "answer", "pic_path")
    misses_before = len(resolver.missing)
    train_file, eval_file = (find_split_file(task_dir, split) for split in ("train", "eval"))
    test_file = find_split_file(task_dir, "karpathy_test", tables=False)  # nested answers: JSON only
    train = load_records(train_file, required=required, limit=cfg_get(benchmark_cfg, "train_size"))
    eval_records = held_out_sample(list(enumerate(load_records(eval_file, required=required))),  # (index, record)
                                   cfg_get(benchmark_cfg, "eval_size"), seed, name)
    test = karpathy_test_records(test_file)[:cfg_get(benchmark_cfg, "test_size")]
    splits = {"train": with_images(list(enumerate(train)), resolver, train_file),
              "eval": with_images(eval_records, resolver, eval_file),
              "test": with_images(list(enumerate(test)), resolver, test_file)}
    return Task(
        name=name,
        metric="vqa",
        train=splits["train"],
        eval=splits["eval"],
        test=splits["test"],
        max_new_tokens=VQA_MAX_NEW_TOKENS,
        meta={"missing_images": len(resolver.missing) - misses_before},
    )


def _missing_policy(benchmark_cfg: Any) -> bool:
    policy = str(cfg_get(benchmark_cfg, "missing_images", "error"))
    if policy not in MISSING_POLICIES:
        raise PieceError(f"benchmark.missing_images must be one of {MISSING_POLICIES}, got '{policy}'")
    return policy == "skip"


@register_benchmark("vqa")
def build_vqa(cfg) -> Benchmark:
    """action, commonsense, count (or `benchmark.tasks`) with the Flickr30K captioning probe."""
    benchmark_cfg = cfg.benchmark
    skip = _missing_policy(benchmark_cfg)
    seed = benchmark_seed(cfg)
    vqa_root = resolve_root(cfg.paths, "vqa_root")
    coco = ImageResolver(resolve_root(cfg.paths, "coco_root"), "paths.coco_root", skip)
    tasks = [load_vqa_task(vqa_root, name, coco, benchmark_cfg, seed)
             for name in cfg_get(benchmark_cfg, "tasks", VQA_TASKS)]
    probe_cfg = cfg_get(benchmark_cfg, "probe", {})
    flickr_root = resolve_root(cfg.paths, "flickr30k_root")
    flickr = ImageResolver(flickr_root, "paths.flickr30k_root", skip, FLICKR_IMAGE_FOLDERS)
    captions = find_split_file(flickr_root, "flickr30k_test", tables=False)  # five captions per image: JSON only
    records = load_flickr30k(captions, flickr, cfg_get(probe_cfg, "n_problems"))
    probe = CaptionProbe(str(cfg_get(probe_cfg, "name", "flickr30k")), records,
                         int(cfg_get(probe_cfg, "max_new_tokens", 128)), len(flickr.missing))
    return Benchmark(name="vqa", tasks=tasks, probe=probe)
