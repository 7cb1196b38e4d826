"""VQA v2 split by question type (VQACL: action, commonsense, count), Flickr30K captioning as the probe.

The authors' records carry absolute `pic_path`s on their machine; we keep only the file name and
look it up under `paths.coco_root` (directly, or in the `train2014`/`val2014` folder its name
states). Test questions come from `karpathy_test.json`, with all ten human answers for the
official VQA accuracy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from piece_cl.data.records import load_json_any, load_records
from piece_cl.data.registry import Benchmark, Task, register_benchmark
from piece_cl.data.trace import cfg_get, find_split_file, held_out_sample, resolve_root
from piece_cl.errors import PieceError

VQA_TASKS = ["action", "commonsense", "count"]
VQA_MAX_NEW_TOKENS = 16
CAPTION_PROMPT = "Give a short description of the image."
MISSING_POLICIES = ("error", "skip")
_COCO_SPLIT = re.compile(r"(train|val|test)\d{4}")
FLICKR_IMAGE_FOLDERS = ("flickr30k-images", "images")


@dataclass
class ImageResolver:
    """Maps a file name to an image under `root`; counts misses when told to skip them."""

    root: Path
    config_key: str
    skip_missing: bool = False
    subfolders: tuple[str, ...] = ()
    missing: list[str] = field(default_factory=list)

    def candidates(self, name: str) -> list[Path]:
        split = _COCO_SPLIT.search(name)  # COCO_val2014_000000262175.jpg lives in val2014/
        folders = [self.root, *(self.root / sub for sub in self.subfolders)]
        if split:
            folders.append(self.root / split.group())
        return [folder / name for folder in folders]

    def resolve(self, original: str, record: str) -> Path | None:
        """The image file of `original`; `record` ("<file>: record <i>") names the record that wants it."""
        name = Path(original).name
        for candidate in self.candidates(name):
            if candidate.is_file():
                return candidate
        if not self.skip_missing:
            raise PieceError(f"{record}: image {name} not found under {self.config_key} = {self.root} "
                             f"(set benchmark.missing_images=skip to skip and count missing images)")
        self.missing.append(name)
        return None


def _with_images(numbered: list[tuple[int, dict]], resolver: ImageResolver, source: Path) -> list[dict]:
    """Records (with their index in `source`) given their image path under "image"; those without an
    image are dropped (skip mode). Checked at loading, so a missing image stops a run before it trains."""
    kept = []
    for index, record in numbered:
        image = resolver.resolve(record["pic_path"], f"{source}: record {index}")
        if image is not None:
            kept.append({**record, "image": str(image)})
    return kept


def top_answer(label: dict[str, float], answers: list[str]) -> str:
    """The gold answer: the highest-scoring human answer (VQACL's `label`), else the most frequent."""
    if label:
        return max(label, key=label.get)
    return max(answers, key=answers.count)


def karpathy_test_records(path: Path) -> list[dict]:
    """Test questions with their ten human answers under "references" (scored by the "vqa" rule)."""
    records = []
    for index, item in enumerate(load_json_any(path)):
        try:
            answers = [a["answer"] for a in item["answers"]]
            records.append({
                "prompt": item["sent"],
                "answer": top_answer(item.get("label") or {}, answers),
                "references": answers,
                "pic_path": item["img_id"] + ".jpg",
                "question_id": item["question_id"],
            })
        except (KeyError, TypeError, ValueError):
            raise PieceError(f"{path}: record {index} lacks sent / answers / img_id / question_id") from None
    return records


def load_vqa_task(root: Path, name: str, resolver: ImageResolver, benchmark_cfg: Any = None, seed: int = 42) -> Task:
    if name not in VQA_TASKS:
        raise PieceError(f"unknown VQA task '{name}'; known: {', '.join(VQA_TASKS)}")
    task_dir = root / name
    if not task_dir.is_dir():
        raise PieceError(f"VQA task directory {task_dir} not found under paths.vqa_root")
    required = ("prompt", "answer", "pic_path")
    misses_before = len(resolver.missing)
    train_file, eval_file, test_file = (find_split_file(task_dir, split) for split in ("train", "eval", "karpathy_test"))
    train = load_records(train_file, required=required, limit=cfg_get(benchmark_cfg, "train_size"))
    eval_records = held_out_sample(list(enumerate(load_records(eval_file, required=required))),  # (index, record)
                                   cfg_get(benchmark_cfg, "eval_size"), seed, name)
    test = karpathy_test_records(test_file)[:cfg_get(benchmark_cfg, "test_size")]
    splits = {"train": _with_images(list(enumerate(train)), resolver, train_file),
              "eval": _with_images(eval_records, resolver, eval_file),
              "test": _with_images(list(enumerate(test)), resolver, test_file)}
    return Task(
        name=name,
        metric="vqa",
        train=splits["train"],
        eval=splits["eval"],
        test=splits["test"],
        max_new_tokens=VQA_MAX_NEW_TOKENS,
        meta={"missing_images": len(resolver.missing) - misses_before},
    )


def load_flickr30k(path: Path, resolver: ImageResolver, n_images: int | None = None) -> list[dict]:
    """Karpathy test split: one record per image, the five captions under "references"."""
    records = []
    for index, item in enumerate(load_json_any(path)[:n_images]):
        if not isinstance(item, dict) or not isinstance(item.get("image_name"), str) or not item.get("captions"):
            raise PieceError(f"{path}: record {index} lacks image_name / captions")
        image = resolver.resolve(item["image_name"], f"{path}: record {index}")
        if image is not None:
            records.append({"prompt": CAPTION_PROMPT, "answer": item["captions"][0],
                            "references": list(item["captions"]), "image": str(image)})
    return records


@dataclass
class CaptionProbe:
    """Flickr30K: greedy captions scored by the mean of ROUGE-L and BLEU against five references."""

    name: str
    records: list[dict]
    max_new_tokens: int = 128
    missing_images: int = 0

    def evaluate(self, model, tokenizer, gen_cfg, shard=None) -> tuple[float, list[dict]]:
        from piece_cl.evaluation.generation import generate
        from piece_cl.evaluation.scorers import score

        predictions = generate(
            model, tokenizer, [r["prompt"] for r in self.records], max_new_tokens=self.max_new_tokens,
            batch_size=gen_cfg.get("batch_size", 16), images=[r["image"] for r in self.records], shard=shard,
        )
        references = [r["references"] for r in self.records]
        items = [{"image": r["image"], "prediction": p, "references": r["references"]}
                 for r, p in zip(self.records, predictions)]
        return score("caption", predictions, references), items


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
    seed = int(cfg_get(benchmark_cfg, "seed", cfg_get(cfg, "seed", 42)))
    vqa_root = resolve_root(cfg.paths, "vqa_root")
    coco = ImageResolver(resolve_root(cfg.paths, "coco_root"), "paths.coco_root", skip)
    tasks = [load_vqa_task(vqa_root, name, coco, benchmark_cfg, seed)
             for name in cfg_get(benchmark_cfg, "tasks", VQA_TASKS)]
    probe_cfg = cfg_get(benchmark_cfg, "probe", {})
    flickr_root = resolve_root(cfg.paths, "flickr30k_root")
    flickr = ImageResolver(flickr_root, "paths.flickr30k_root", skip, FLICKR_IMAGE_FOLDERS)
    records = load_flickr30k(find_split_file(flickr_root, "flickr30k_test"), flickr, cfg_get(probe_cfg, "n_problems"))
    probe = CaptionProbe("flickr30k", records, int(cfg_get(probe_cfg, "max_new_tokens", 128)), len(flickr.missing))
    return Benchmark(name="vqa", tasks=tasks, probe=probe)
