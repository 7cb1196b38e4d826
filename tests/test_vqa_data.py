"""VQA v2 (VQACL split) and Flickr30K loaders on the real shipped files, with synthetic images."""
import json
import shutil

import pytest
from omegaconf import OmegaConf
from PIL import Image

from piece_cl.benchmarks.registry import build_benchmark
from piece_cl.benchmarks.vqa import load_vqa_task
from piece_cl.data.vqa import CAPTION_PROMPT, ImageResolver, karpathy_test_records
from piece_cl.errors import PieceError
from piece_cl.evaluation import scorers

# Table 3 of the paper: test questions per type, with all ten human answers.
KARPATHY_COUNTS = {"action": 1448, "commonsense": 1227, "count": 2905}
SIZES = {"train_size": 6, "eval_size": 4, "test_size": 5}


def make_images(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4), (len(name) % 255, 0, 0)).save(root / name, format="JPEG")


def needed_coco_images(shared_data, task):
    """File names of the first records of each split (train/eval cut after sampling may pick any eval record)."""
    base = shared_data / "vqa_v2" / task
    train = json.loads((base / "train.json").read_text())[:SIZES["train_size"]]
    evals = json.loads((base / "eval.json").read_text())
    test = json.loads((base / "karpathy_test.json").read_text())[:SIZES["test_size"]]
    paths = [r["pic_path"] for r in train + evals]
    return {p.rsplit("/", 1)[-1] for p in paths} | {r["img_id"] + ".jpg" for r in test}


@pytest.fixture
def roots(tmp_path, shared_data):
    coco, flickr = tmp_path / "coco", tmp_path / "flickr30k"
    for task in KARPATHY_COUNTS:
        names = needed_coco_images(shared_data, task)
        make_images(coco / "val2014", [n for n in names if "val2014" in n])  # found through the split folder
        make_images(coco, [n for n in names if "val2014" not in n])          # found directly under the root
    captions = json.loads((shared_data / "flickr30k" / "flickr30k_test.json").read_text())
    flickr.mkdir()
    shutil.copy(shared_data / "flickr30k" / "flickr30k_test.json", flickr)
    make_images(flickr / "flickr30k-images", [c["image_name"] for c in captions[:3]])
    return coco, flickr


def vqa_cfg(shared_data, coco, flickr, **benchmark):
    return OmegaConf.create({
        "seed": 42,
        "paths": {"vqa_root": str(shared_data / "vqa_v2"), "coco_root": str(coco), "flickr30k_root": str(flickr)},
        "benchmark": {"name": "vqa", "tasks": list(KARPATHY_COUNTS), "missing_images": "error",
                      "probe": {"name": "flickr30k", "max_new_tokens": 128, "n_problems": 3}, **SIZES, **benchmark},
    })


def test_karpathy_test_counts_and_ten_answers(shared_data):
    for task, count in KARPATHY_COUNTS.items():
        records = karpathy_test_records(shared_data / "vqa_v2" / task / "karpathy_test.json")
        assert len(records) == count
        assert all(len(r["references"]) == 10 for r in records)
        assert all(r["answer"] in r["references"] for r in records)


def test_vqa_benchmark_with_synthetic_images(shared_data, roots):
    coco, flickr = roots
    benchmark = build_benchmark(vqa_cfg(shared_data, coco, flickr))
    assert [t.name for t in benchmark.tasks] == ["action", "commonsense", "count"]
    for task in benchmark.tasks:
        assert (len(task.train), len(task.eval), len(task.test)) == (6, 4, 5)
        assert task.metric == "vqa" and task.meta["missing_images"] == 0
        for record in task.train + task.eval + task.test:
            assert record["image"].startswith(str(coco)) and Image.open(record["image"]).size == (4, 4)
        gold = [scorers.reference_of(r) for r in task.test]
        assert scorers.score(task.metric, [r["answer"] for r in task.test], gold) > 0
    probe = benchmark.probe
    assert probe.name == "flickr30k" and len(probe.records) == 3
    assert all(r["prompt"] == CAPTION_PROMPT and len(r["references"]) == 5 for r in probe.records)


def test_missing_image_is_an_error_naming_the_file_unless_skipped(shared_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PieceError, match=r"image COCO_\w+\.jpg not found under paths.coco_root"):
        load_vqa_task(shared_data / "vqa_v2", "count", ImageResolver(empty, "paths.coco_root"))
    resolver = ImageResolver(empty, "paths.coco_root", skip_missing=True)
    task = load_vqa_task(shared_data / "vqa_v2", "count", resolver, OmegaConf.create({"eval_size": None}))
    assert task.meta["missing_images"] == 1000 + 200 + 2905  # every shipped record, counted
    assert task.train == task.eval == task.test == []


def test_skip_mode_keeps_the_rest_and_reports_the_count(shared_data, roots, tmp_path):
    _, flickr = roots
    coco = tmp_path / "coco_action_only"
    made = needed_coco_images(shared_data, "action")
    make_images(coco, made)
    test = json.loads((shared_data / "vqa_v2" / "action" / "karpathy_test.json").read_text())[:12]
    absent = [r for r in test if r["img_id"] + ".jpg" not in made]
    assert absent  # the first 5 test images were made, some of the next 7 were not
    cfg = vqa_cfg(shared_data, coco, flickr, tasks=["action"], missing_images="skip", test_size=12)
    task = build_benchmark(cfg).tasks[0]
    assert len(task.test) == 12 - len(absent) and task.meta["missing_images"] == len(absent)
    with pytest.raises(PieceError, match="missing_images"):
        build_benchmark(OmegaConf.merge(cfg, {"benchmark": {"missing_images": "ignore"}}))


def test_caption_probe_scores_generations(shared_data, roots, monkeypatch):
    import piece_cl.evaluation.generation as generation

    coco, flickr = roots
    probe = build_benchmark(vqa_cfg(shared_data, coco, flickr, tasks=["action"],
                                     probe={"name": "f30k", "max_new_tokens": 128, "n_problems": 3})).probe
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size=16, images=None, **_):
        seen["images"] = images
        return [r["references"][0] for r in probe.records[:-1]] + [""]

    monkeypatch.setattr(generation, "generate", fake_generate)
    value, items = probe.evaluate(None, None, {"batch_size": 2})
    assert value == pytest.approx(100 * 2 / 3, abs=1e-4)
    assert probe.name == "f30k"  # benchmark.probe.name
    assert seen["images"] == [r["image"] for r in probe.records] and len(items) == 3
