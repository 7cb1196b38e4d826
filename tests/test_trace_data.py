"""TRACE and HumanEval loaders on the real shipped files (counts from the shipped data README)."""
import gzip
import json

import pytest
from omegaconf import OmegaConf

from piece_cl.benchmarks.trace import build_humaneval_probe
from piece_cl.data.humaneval import load_humaneval
from piece_cl.benchmarks.registry import build_benchmark
from piece_cl.benchmarks.trace import TRACE_TASKS, load_trace_task
from piece_cl.errors import PieceError
from piece_cl.evaluation.code_probe import build_program
from piece_cl.evaluation.sandbox import check_programs

# (train, eval, test) records per shipped task; MeetingBank ships no train.json.
SHIPPED_COUNTS = {
    "C-STANCE": (1000, 2000, 2000), "FOMC": (1000, 496, 496), "ScienceQA": (1000, 2000, 2000),
    "NumGLUE-cm": (1000, 41, 81), "NumGLUE-ds": (1000, 164, 325), "20Minuten": (1000, 200, 200),
    "Py150": (1000, 100, 100),
}
SHIPPED_TASKS = [t for t in TRACE_TASKS if t in SHIPPED_COUNTS]


def trace_cfg(shared_data, **benchmark):
    return OmegaConf.create({
        "seed": 42,
        "paths": {"trace_root": str(shared_data / "trace"), "humaneval_path": None},
        "benchmark": {"name": "trace", "tasks": SHIPPED_TASKS, "train_size": None, "eval_size": None,
                      "test_size": None, "probe": {"max_new_tokens": 128, "timeout": 5.0, "n_problems": None},
                      **benchmark},
    })


def test_trace_benchmark_on_shipped_files(shared_data):
    benchmark = build_benchmark(trace_cfg(shared_data))
    assert [t.name for t in benchmark.tasks] == SHIPPED_TASKS  # the paper's order
    for task in benchmark.tasks:
        assert (len(task.train), len(task.eval), len(task.test)) == SHIPPED_COUNTS[task.name]
        assert task.max_new_tokens == (16 if task.name in {"C-STANCE", "FOMC", "NumGLUE-cm", "NumGLUE-ds"} else 256)
        assert task.metric == task.name
        assert all(isinstance(r["prompt"], str) and isinstance(r["answer"], str) for r in task.test)
    assert benchmark.probe.name == "humaneval_pass@1"
    assert (len(benchmark.probe.problems), benchmark.probe.max_new_tokens, benchmark.probe.timeout) == (164, 128, 5.0)
    assert benchmark.probe.style == "authors"


def test_sizes_and_fixed_held_out_sample(shared_data):
    cfg = trace_cfg(shared_data, tasks=["FOMC"], train_size=20, eval_size=30, test_size=10)
    first, again = build_benchmark(cfg).tasks[0], build_benchmark(cfg).tasks[0]
    assert (len(first.train), len(first.eval), len(first.test)) == (20, 30, 10)
    assert first.eval == again.eval  # same seed -> same held-out sample
    full_eval = json.loads((shared_data / "trace" / "FOMC" / "eval.json").read_text())
    assert all(r in full_eval for r in first.eval)
    other_seed = build_benchmark(OmegaConf.merge(cfg, {"benchmark": {"seed": 7}})).tasks[0]
    assert other_seed.eval != first.eval


def test_all_eight_tasks_need_meetingbank_train_file(shared_data):
    cfg = trace_cfg(shared_data, tasks=TRACE_TASKS)
    with pytest.raises(PieceError, match="no train.json.*MeetingBank"):
        build_benchmark(cfg)


def test_missing_root_names_the_config_key(tmp_path, shared_data):
    cfg = OmegaConf.merge(trace_cfg(shared_data), {"paths": {"trace_root": str(tmp_path / "nowhere")}})
    with pytest.raises(PieceError, match="paths.trace_root"):
        build_benchmark(cfg)
    with pytest.raises(PieceError, match="unknown TRACE task"):
        load_trace_task(shared_data / "trace", "SQuAD")


def test_loader_reads_jsonl_and_gzip(tmp_path):
    records = [{"prompt": f"Question {i}\nAnswer:", "answer": str(i)} for i in range(5)]
    task_dir = tmp_path / "FOMC"
    task_dir.mkdir()
    (task_dir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with gzip.open(task_dir / "eval.json.gz", "wt") as handle:
        json.dump(records[:2], handle)
    (task_dir / "test.json").write_text(json.dumps(records[2:]))
    task = load_trace_task(tmp_path, "FOMC")
    assert (task.train, task.eval, task.test) == (records, records[:2], records[2:])
    (task_dir / "test.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(PieceError, match="record 0 has no string field 'answer'"):
        load_trace_task(tmp_path, "FOMC")


def test_humaneval_packaged_file_equals_shipped_copy(shared_data):
    packaged = load_humaneval()
    assert packaged == load_humaneval(shared_data / "humaneval" / "HumanEval.jsonl.gz")
    assert len(packaged) == 164 and len(load_humaneval(n_problems=10)) == 10
    cfg = OmegaConf.create({"paths": {"humaneval_path": None},
                            "benchmark": {"probe": {"n_problems": 3, "style": "stop_sequences"}}})
    probe = build_humaneval_probe(cfg)
    assert (len(probe.problems), probe.style, probe.max_new_tokens) == (3, "stop_sequences", 128)


def test_humaneval_loads_all_164_and_whole_programs_still_run(shared_data):
    """All 164 through the probe's path: test_sandbox.py; here the loader and a sample as whole programs."""
    problems = load_humaneval()
    assert len(problems) == 164 and len({p["task_id"] for p in problems}) == 164
    results = check_programs([build_program(p, p["canonical_solution"]) for p in problems[::20]], timeout=10.0)
    assert [r.status for r in results] == ["passed"] * len(results)
    wrong = check_programs([build_program(problems[0], "    return None\n")], timeout=10.0)
    assert not wrong[0].passed
