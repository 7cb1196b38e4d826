"""TRACE and VQA tasks kept as Hugging Face `datasets` copies (parquet, or save_to_disk directories),
written here from the real shipped JSON: the benchmark built from them equals the one built from JSON."""
import json
import shutil

import datasets
import pytest
from omegaconf import OmegaConf

from piece_cl.benchmarks.registry import build_benchmark
from piece_cl.benchmarks.vqa import load_vqa_task
from piece_cl.data.records import find_split_file, load_records
from piece_cl.data.vqa import ImageResolver
from piece_cl.errors import PieceError
from tests.test_vqa_data import SIZES, roots  # noqa: F401 - the fixture

datasets.disable_progress_bars()


def trace_cfg(root, tasks):
    return OmegaConf.create({
        "seed": 42, "paths": {"trace_root": str(root), "humaneval_path": None},
        "benchmark": {"name": "trace", "tasks": tasks, "train_size": None, "eval_size": 50, "test_size": 100,
                      "probe": {"n_problems": 1}},
    })


def rows(path):
    return json.loads(path.read_text())


def test_trace_from_parquet_and_save_to_disk_equals_json(shared_data, tmp_path):
    source = shared_data / "trace"
    for split in ("train", "eval", "test"):  # FOMC as parquet files
        (tmp_path / "FOMC").mkdir(exist_ok=True)
        datasets.Dataset.from_list(rows(source / "FOMC" / f"{split}.json")).to_parquet(
            str(tmp_path / "FOMC" / f"{split}.parquet"))
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows(source / "NumGLUE-cm" / f"{split}.json"))
                          for split in ("train", "eval", "test")}).save_to_disk(str(tmp_path / "NumGLUE-cm"))
    assert find_split_file(tmp_path / "NumGLUE-cm", "train") == tmp_path / "NumGLUE-cm" / "train"
    tasks = ["FOMC", "NumGLUE-cm"]
    from_tables, from_json = build_benchmark(trace_cfg(tmp_path, tasks)), build_benchmark(trace_cfg(source, tasks))
    for table_task, json_task in zip(from_tables.tasks, from_json.tasks):
        assert len(table_task.train) == 1000 and len(table_task.eval) == min(50, len(rows(source / table_task.name / "eval.json")))
        assert (table_task.train, table_task.eval, table_task.test) == (json_task.train, json_task.eval, json_task.test)


def test_vqa_train_and_eval_from_parquet_equal_json(shared_data, roots, tmp_path):  # noqa: F811
    coco, _ = roots
    source = shared_data / "vqa_v2" / "action"
    task_dir = tmp_path / "vqa" / "action"
    task_dir.mkdir(parents=True)
    for split in ("train", "eval"):
        datasets.Dataset.from_list(rows(source / f"{split}.json")).to_parquet(str(task_dir / f"{split}.parquet"))
    shutil.copy(source / "karpathy_test.json", task_dir)  # nested answers stay JSON
    resolver = ImageResolver(coco, "paths.coco_root")
    from_tables = load_vqa_task(tmp_path / "vqa", "action", resolver, SIZES, seed=42)
    from_json = load_vqa_task(shared_data / "vqa_v2", "action", resolver, SIZES, seed=42)
    assert len(from_tables.train) == SIZES["train_size"] and len(from_tables.eval) == SIZES["eval_size"]
    assert (from_tables.train, from_tables.eval, from_tables.test) == (from_json.train, from_json.eval, from_json.test)


def test_unreadable_parquet_is_one_error_naming_the_file(tmp_path):
    broken = tmp_path / "train.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(PieceError, match="train.parquet: not a readable parquet file"):
        load_records(find_split_file(tmp_path, "train"))
    assert broken.read_bytes() == b"not parquet at all"  # never touched
    with pytest.raises(PieceError, match="no eval.json.*parquet.*save_to_disk"):
        find_split_file(tmp_path, "eval")


def test_parquet_records_are_checked_like_json(tmp_path):
    datasets.Dataset.from_list([{"prompt": "p", "answer": "a"}, {"prompt": "q", "answer": None}]).to_parquet(
        str(tmp_path / "train.parquet"))
    with pytest.raises(PieceError, match="record 1 has no string field 'answer'"):
        load_records(tmp_path / "train.parquet")
