"""protocol=official_code runs PIECE's importance pass with the authors' per-task mini-batch and their
collator's cut (docs/importance.md "Two protocols"); protocol=paper keeps per-sample statistics on the
training encoding."""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from piece_cl.benchmarks.registry import Task
from piece_cl.benchmarks.trace import TRACE_TASKS
from piece_cl.cli import CONFIG_DIR
from piece_cl.data.authors_importance import batch_size_for_task, encode_like_authors, importance_features
from piece_cl.data.collate import encode_all
from piece_cl.errors import PieceError
from piece_cl.methods import piece as piece_module
from piece_cl.methods.base import StageContext, build_method
from piece_cl.models.families import build_tiny
from piece_cl.training.engine import TorchEngine

# docs/paper-notes.md §3: batch 1 for MeetingBank, ScienceQA, 20Minuten, Py150; 4 for the others.
AUTHORS_BATCH = {"C-STANCE": 4, "FOMC": 4, "MeetingBank": 1, "ScienceQA": 1,
                 "NumGLUE-cm": 4, "NumGLUE-ds": 4, "20Minuten": 1, "Py150": 1}
PROMPT_LEN, ANSWER_LEN = 256, 128   # their importance collator's max_prompt_len / max_ans_len
N_RECORDS = 16


def _method_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True))


def trace_records(shared_data, task, n=N_RECORDS):
    """The first `n` training records of a TRACE task (MeetingBank ships no train.json: its test.json)."""
    folder = shared_data / "trace" / task
    path = folder / "train.json" if (folder / "train.json").is_file() else folder / "test.json"
    return json.loads(path.read_text())[:n]


def trace_collator_reference(tokenizer, batch, max_prompt_len, max_ans_len):
    """TRACE's DataCollator (training branch) as released: left padding, labels on the last label_len
    positions; its own HF truncation. Returns the unpadded rows (ids, labels) for comparison."""
    limit = max_prompt_len + max_ans_len

    def tokenize(text, add_bos, add_eos):
        ids = tokenizer(text, truncation=True, max_length=limit, add_special_tokens=False)["input_ids"]
        if len(ids) < limit and add_eos:
            ids = ids + [tokenizer.eos_token_id]
        if len(ids) < limit and add_bos:
            ids = [tokenizer.bos_token_id] + ids
        return ids

    sources, label_lens = [], []
    for instance in batch:
        label_lens.append(len(tokenize(instance["answer"], False, True)))
        sources.append(tokenize(instance["prompt"] + instance["answer"], True, True))
    width = max(len(s) for s in sources)
    rows = []
    for ids, label_len in zip(sources, label_lens):
        padded = [tokenizer.pad_token_id] * (width - len(ids)) + ids
        labels = [-100] * (width - label_len) + padded[-label_len:]
        rows.append((padded[width - len(ids):], labels[width - len(ids):]))
    return rows


@pytest.mark.parametrize("method", ["piece_f", "piece_s"])
def test_official_code_sets_the_authors_batch_and_cut_per_trace_task(method):
    imp = _method_cfg(f"method={method}", "protocol=official_code", "benchmark=trace").importance
    assert imp.granularity == "batch" and imp.reduction == "mean" and imp.xi_on_sums
    assert imp.truncation == "authors" and (imp.max_prompt_len, imp.max_answer_len) == (PROMPT_LEN, ANSWER_LEN)
    assert {task: batch_size_for_task(imp.batch_size, task) for task in TRACE_TASKS} == AUTHORS_BATCH


def test_official_code_is_batch_4_without_a_table_and_paper_keeps_the_training_encoding():
    assert _method_cfg("method=piece_s", "protocol=official_code", "benchmark=vqa").importance.batch_size == 4
    paper = _method_cfg("method=piece_f", "benchmark=trace").importance
    assert paper.granularity == "sample" and paper.reduction == "sum" and paper.truncation == "training"


def test_the_table_is_overridable_and_a_missing_task_is_named():
    imp = _method_cfg("method=piece_s", "protocol=official_code", "benchmark=trace",
                      "benchmark.importance.batch_size.MeetingBank=4").importance
    assert batch_size_for_task(imp.batch_size, "MeetingBank") == 4
    assert batch_size_for_task(imp.batch_size, "ScienceQA") == 1
    flat = _method_cfg("method=piece_s", "protocol=official_code", "benchmark=trace", "method.importance.batch_size=2")
    assert batch_size_for_task(flat.importance.batch_size, "Py150") == 2
    with pytest.raises(PieceError, match="benchmark.importance.batch_size.SQuAD"):
        batch_size_for_task(imp.batch_size, "SQuAD")
    with pytest.raises(PieceError, match="positive integer"):
        batch_size_for_task({"FOMC": 0}, "FOMC")
    with pytest.raises(PieceError, match="method.importance.truncation"):
        importance_features(None, [], "left", lambda r: r)


def test_authors_cut_equals_their_collator_on_real_trace_records(shared_data):
    _, tokenizer = build_tiny("llama")
    cut = whole = 0
    for task in TRACE_TASKS:
        records = trace_records(shared_data, task)
        features = importance_features(tokenizer, records, "authors", encode=None)
        for start in range(0, len(records), AUTHORS_BATCH[task]):
            batch = records[start : start + AUTHORS_BATCH[task]]
            reference = trace_collator_reference(tokenizer, batch, PROMPT_LEN, ANSWER_LEN)
            for feature, (ids, labels) in zip(features[start : start + len(batch)], reference):
                assert feature["input_ids"] == ids and feature["labels"] == labels, task
        limit = PROMPT_LEN + ANSWER_LEN
        for record, f in zip(records, features):
            ids = f["input_ids"]
            raw = tokenizer(record["prompt"] + record["answer"], add_special_tokens=False)["input_ids"]
            if len(raw) >= limit:
                cut += 1     # the start kept; neither EOS nor BOS added (Py150 prompts hold a literal "<s>")
                assert ids == raw[:limit]
            elif len(raw) < limit - 1:
                whole += 1   # room for EOS, then BOS
                assert ids == [tokenizer.bos_token_id] + raw + [tokenizer.eos_token_id]
    assert cut and whole  # both branches of their collator were exercised


def test_the_training_encoding_differs_where_the_authors_cut(shared_data):
    """The same long record: training keeps the prompt's end and the answer; the authors' cut keeps the start."""
    _, tokenizer = build_tiny("llama")
    records = trace_records(shared_data, "MeetingBank", 4)
    training = encode_all(tokenizer, records, 1024, 512)
    authors = importance_features(tokenizer, records, "authors", encode=None)
    assert importance_features(tokenizer, records, "training", lambda r: encode_all(tokenizer, r, 1024, 512)) == training
    long_one = next(i for i, f in enumerate(authors) if len(f["input_ids"]) == PROMPT_LEN + ANSWER_LEN)
    answer = tokenizer(records[long_one]["answer"], add_special_tokens=False)["input_ids"]
    assert [t for t in training[long_one]["labels"] if t != -100][:-1] == answer[:511]
    assert authors[long_one]["input_ids"] != training[long_one]["input_ids"][: PROMPT_LEN + ANSWER_LEN]


def test_before_task_scores_the_authors_batches(shared_data, tmp_path, monkeypatch):
    """PIECE's importance pass itself: batch 1 on MeetingBank, 4 on FOMC, rows cut as the authors did."""
    model, tokenizer = build_tiny("llama")
    cfg = _method_cfg("method=piece_s", "protocol=official_code", "benchmark=trace")
    method = build_method(cfg)
    trainer = OmegaConf.create({"device": "cpu", "batch_size": 4, "micro_batch_size": 4,
                                "max_prompt_len": 256, "max_answer_len": 64})
    engine = TorchEngine(trainer, method.setup(model), tokenizer)
    seen = []
    real_estimate = piece_module.estimate

    def recording_estimate(model, batches, *args, **kwargs):
        batches = list(batches)
        seen.append(batches)
        return real_estimate(model, batches, *args, **kwargs)

    monkeypatch.setattr(piece_module, "estimate", recording_estimate)
    for t, name in enumerate(["MeetingBank", "FOMC"]):
        records = trace_records(shared_data, name, 8)
        task = Task(name=name, metric=name, train=records, eval=[], test=[])
        ctx = StageContext(t=t, task=task, tasks_seen=[task], model=engine.model, tokenizer=tokenizer, engine=engine,
                           cfg=OmegaConf.create({"trainer": trainer}), stage_dir=tmp_path / name, seed=0, log=lambda m: None)
        ctx.stage_dir.mkdir()
        method.before_task(ctx)
        batches = seen[-1]
        assert [b["input_ids"].shape[0] for b in batches] == [AUTHORS_BATCH[name]] * (8 // AUTHORS_BATCH[name])
        expected = [encode_like_authors(tokenizer, r) for r in records]
        rows = [(ids, labels) for b in batches for ids, labels in zip(b["input_ids"].tolist(), b["labels"].tolist())]
        for (ids, labels), want in zip(rows, expected):
            n = len(want["input_ids"])
            assert ids[:n] == want["input_ids"] and labels[:n] == want["labels"]
            assert all(label == -100 for label in labels[n:])
        assert sum(idx.numel() for idx in method.masks.values()) > 0
        assert torch.isfinite(batches[0]["input_ids"]).all()
