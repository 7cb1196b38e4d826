"""The embedded miniature: tokenizer, model, mini-HumanEval, cached pretraining, generation, probe, tasks."""
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from piece_cl.data import mini_humaneval, tiny_tasks
from piece_cl.benchmarks.registry import build_benchmark
from piece_cl.evaluation import generation
from piece_cl.evaluation.code_probe import CodeProbe, build_program, postprocess_completion
from piece_cl.evaluation.generation import generate
from piece_cl.evaluation.sandbox import check_programs
from piece_cl.models import pretrain
from piece_cl.models.tiny import build_tiny_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL_ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def small_model_cfg(**pretrain_overrides):
    cfg = OmegaConf.load(ROOT / "configs/model/tiny.yaml")
    cfg.arch = SMALL_ARCH
    cfg.tokenizer.vocab_size = 400
    cfg.pretrain = OmegaConf.merge(cfg.pretrain, {"problems": 200, "steps": 40, "batch_size": 8, "lr": 1e-2},
                                   pretrain_overrides)
    return cfg


@pytest.fixture(scope="module")
def cached_miniature(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model, tokenizer = pretrain.load_miniature(small_model_cfg(), cache)
    return cache, model, tokenizer


def test_tokenizer_round_trips_and_splits_digits(tmp_path):
    tokenizer = build_tokenizer(tiny_tasks.tokenizer_corpus(50), vocab_size=400)
    text = 'def f(x: int) -> int:\n    """Return x plus 12345."""\n    return x + 12345\n'
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("12345")["input_ids"]) == list("12345")
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert build_tokenizer(tiny_tasks.tokenizer_corpus(50), 400).get_vocab() == tokenizer.get_vocab()


def test_tiny_model_is_a_llama_with_the_papers_module_names():
    tokenizer = build_tokenizer(tiny_tasks.tokenizer_corpus(20), vocab_size=300)
    model = build_tiny_model(SMALL_ARCH, tokenizer)
    assert isinstance(model, LlamaForCausalLM)
    names = {name for name, _ in model.named_parameters()}
    layer = "model.layers.0."
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"{layer}{module}.weight" in names
    assert {f"{layer}input_layernorm.weight", f"{layer}post_attention_layernorm.weight", "model.norm.weight",
            "lm_head.weight", "model.embed_tokens.weight"} <= names
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id


def test_canonical_solutions_pass_their_tests_and_wrong_ones_fail():
    problems = mini_humaneval.probe_problems(20) + mini_humaneval.training_problems(20)
    assert {p["entry_point"] for p in problems} >= {f.name for f in mini_humaneval.FAMILIES} - {"repeat_text"}
    right = [build_program(p, p["canonical_solution"]) for p in problems]
    wrong = [build_program(p, "    return None\n") for p in problems]
    results = check_programs(right + wrong, timeout=10.0)
    assert [r.status for r in results[:len(problems)]] == ["passed"] * len(problems)
    assert not any(r.passed for r in results[len(problems):])


def test_probe_problems_are_held_out_from_training():
    def docstring(p):
        return p["prompt"].split(">>>")[0]

    trained = {docstring(p) for p in mini_humaneval.training_problems(3000)}
    probe = mini_humaneval.probe_problems(200)
    assert not trained & {docstring(p) for p in probe}
    assert mini_humaneval.probe_problems(10, seed=3) == mini_humaneval.probe_problems(10, seed=3)


def test_pretraining_is_cached_and_reused(cached_miniature, monkeypatch):
    cache, model, tokenizer = cached_miniature
    entries = [e.name for e in (cache / "miniature").iterdir() if not e.name.endswith(".lock")]
    assert entries == [pretrain.cache_key(small_model_cfg())]  # no staging left behind

    def must_not_pretrain(_cfg):
        raise AssertionError("pretrained again instead of using the cache")

    monkeypatch.setattr(pretrain, "pretrain", must_not_pretrain)
    again, again_tokenizer = pretrain.load_miniature(small_model_cfg(), cache)
    assert again_tokenizer.get_vocab() == tokenizer.get_vocab()
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), name
    assert pretrain.cache_key(small_model_cfg(steps=41)) != pretrain.cache_key(small_model_cfg())
    changed_finetuning = small_model_cfg()
    changed_finetuning.lr = 0.5
    assert pretrain.cache_key(changed_finetuning) == pretrain.cache_key(small_model_cfg())


def test_concurrent_loads_pretrain_once(cached_miniature, tmp_path, monkeypatch):
    """Two runs starting together on an empty cache (a multirun, two test workers): one pretrains, the
    other waits for its lock and loads the result."""
    _, model, tokenizer = cached_miniature
    calls = []

    def slow_pretrain(_cfg):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        return model, tokenizer

    monkeypatch.setattr(pretrain, "pretrain", slow_pretrain)
    # Loading stays out of the threads: from_pretrained's global init switches are not thread-safe, and two
    # concurrent loads in one process left later models untied (a multirun's runs are separate processes).
    monkeypatch.setattr(pretrain, "_load_verified", lambda target, _cfg: target)
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(pretrain.load_miniature(small_model_cfg(), tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(loaded) == 2
    assert [e.name for e in (tmp_path / "miniature").iterdir() if not e.name.endswith(".lock")] == \
        [pretrain.cache_key(small_model_cfg())]


def test_pretraining_is_deterministic(cached_miniature, tmp_path):
    _, model, _ = cached_miniature
    fresh, _ = pretrain.load_miniature(small_model_cfg(), tmp_path)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name


def test_pretraining_weights_do_not_depend_on_the_thread_count(cached_miniature, monkeypatch):
    """Pretraining runs at one thread whatever the caller set (and gives the thread count back)."""
    _, model, _ = cached_miniature
    seen = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.append(torch.get_num_threads()),
                                                                          real_step(self, *a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fresh, _ = pretrain.pretrain(small_model_cfg())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {1}
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name


def test_batched_generation_equals_one_at_a_time(cached_miniature):
    _, model, tokenizer = cached_miniature
    prompts = [p["prompt"] for p in mini_humaneval.probe_problems(6)] + ["def", "Solve the following math problem."]
    calls = []
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4,
                       progress=lambda done, total: calls.append((done, total)))
    single = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert any(batched) and calls[-1] == (len(prompts), len(prompts))
    assert tokenizer.padding_side == "right" and model.training is False


def test_sampling_is_repeatable_with_a_seed(cached_miniature):
    _, model, tokenizer = cached_miniature
    prompts = [p["prompt"] for p in mini_humaneval.probe_problems(4)]
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=10, temperature=1.5, seed=7)
    assert generate(model, tokenizer, prompts, **kwargs) == generate(model, tokenizer, prompts, **kwargs)


@pytest.mark.parametrize("raw, expected", [
    ("\n\n    return x + 1\n\n\ndef other():\n    pass", "    return x + 1"),
    ("    total = 0\n    for n in xs:\n        total += n\n    return total\n", 
     "    total = 0\n    for n in xs:\n        total += n\n    return total\n"),
    ("    return 1\n\n    unreachable\n", "    return 1"),
    ("", ""),
])
def test_postprocess_authors_rule(raw, expected):
    assert postprocess_completion(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("    return x\ndef helper():\n    pass", "    return x"),
    ("    return x\n\n    y = 1\nprint(f(1))", "    return x\n\n    y = 1"),
    ("    return x\n# done\nif __name__:", "    return x"),
    ("    return x\nclass A:", "    return x"),
    ("    return x\n", "    return x\n"),
])
def test_postprocess_stop_sequences(raw, expected):
    assert postprocess_completion(raw, style="stop_sequences") == expected


def test_code_probe_scores_by_executing_tests(monkeypatch):
    problems = mini_humaneval.probe_problems(4)
    # Half right (one with leading newlines and a trailing blank-line tail), half wrong.
    outputs = ["\n" + problems[0]["canonical_solution"] + "\n\nprint('junk')", problems[1]["canonical_solution"],
               "    return 'nope'\n", "    while True:\n        pass\n"]
    monkeypatch.setattr(generation, "generate", lambda model, tokenizer, prompts, **kw: outputs[:len(prompts)])
    probe = CodeProbe("mini_humaneval_pass@1", problems, max_new_tokens=8, timeout=2.0)
    score, records = probe.evaluate(None, None, OmegaConf.create({"batch_size": 4}))
    assert score == 50.0
    assert [r["status"] for r in records] == ["passed", "passed", "failed", "timeout"]


def tiny_benchmark_cfg(seed=0):
    return OmegaConf.create({"benchmark": OmegaConf.load(ROOT / "configs/benchmark/tiny.yaml"), "seed": seed})


def test_tiny_benchmark_is_deterministic_disjoint_and_trace_shaped():
    cfg = tiny_benchmark_cfg()
    cfg.benchmark.seed = 3
    benchmark = build_benchmark(cfg)
    assert [t.name for t in benchmark.tasks] == list(cfg.benchmark.tasks)
    assert [t.metric for t in benchmark.tasks] == ["choice", "number", "bleu_rouge", "edit_sim"]
    assert benchmark.probe.name == "mini_humaneval_pass@1"
    assert len(benchmark.probe.problems) == cfg.benchmark.probe.n_problems
    for task in benchmark.tasks:
        assert (len(task.train), len(task.eval), len(task.test)) == (
            cfg.benchmark.train_size, cfg.benchmark.eval_size, cfg.benchmark.test_size)
        prompts = [{r["prompt"] for r in split} for split in (task.train, task.eval, task.test)]
        assert sum(map(len, prompts)) == len(set().union(*prompts))
        assert all(set(r) == {"prompt", "answer"} and r["answer"] for r in task.train)
    rewrite = benchmark.tasks[2]
    assert min(len(r["answer"].split()) for r in rewrite.test) >= 4
    assert all("<EOL>" in r["prompt"] for r in benchmark.tasks[3].test)
    again = build_benchmark(cfg)
    assert [t.test for t in again.tasks] == [t.test for t in benchmark.tasks]
    cfg.benchmark.seed = 4
    assert build_benchmark(cfg).tasks[0].train != benchmark.tasks[0].train


@pytest.mark.slow
def test_spread_script_pretrains_per_setting_and_reports_seeds(tmp_path):
    """scripts/miniature_spread.py at a toy size: one fresh pretraining per setting under its own kernels,
    the default run once per seed, and spreads that are the rows' max - min."""
    import json
    import subprocess
    import sys

    out = tmp_path / "spread.json"
    toy = ["experiment=smoke", "model.pretrain.steps=4", "model.pretrain.problems=40",
           "benchmark.tasks=[tiny_choice,tiny_number]", "benchmark.probe.n_problems=4"]
    subprocess.run([sys.executable, str(ROOT / "scripts" / "miniature_spread.py"), "--settings", "1t", "scalar",
                    "--seeds", "1", "2", "--out", str(out), *toy], check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert rows["scalar"]["capability"] == "DEFAULT" != rows["1t"]["capability"]  # the kernels really differed
    for row in rows.values():
        assert row["seeds"] == [1, 2] and len(row["run_OP_by_seed"]) == 2
        assert row["run_OP"] == pytest.approx(sum(row["run_OP_by_seed"]) / 2)
        assert row["run_OP_seed_spread"] == pytest.approx(max(row["run_OP_by_seed"]) - min(row["run_OP_by_seed"]))
    for key in ("probe", "run_OP", "run_probe"):
        values = [row[key] for row in rows.values()]
        assert report["spread"][key] == pytest.approx(max(values) - min(values))
