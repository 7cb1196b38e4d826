"""Both probes and the tasks decode through one path that honours `eval.*` (greedy, or the authors' sampler).

Defect fixed here: the caption probe called `generate` without the sampling settings, so
`eval=official_sampling` still decoded Flickr30K greedily.
"""
import pytest
from omegaconf import OmegaConf
from PIL import Image

from piece_cl.benchmarks.registry import Task
from piece_cl.cli import CONFIG_DIR
from piece_cl.data import mini_humaneval
from piece_cl.data.vqa import CAPTION_PROMPT
from piece_cl.evaluation import generation
from piece_cl.evaluation.caption_probe import CaptionProbe
from piece_cl.evaluation.code_probe import CodeProbe
from piece_cl.evaluation.evaluate import evaluate_task
from piece_cl.models.families import build_tiny

SAMPLING_KEYS = ("do_sample", "top_k", "top_p", "temperature", "seed", "batch_size")


def eval_config(name: str):
    """`eval=<name>` as piece-run resolves it (seed 7, prompts cut at 64 tokens)."""
    root = OmegaConf.create({"seed": 7, "model": {"max_prompt_len": 64},
                             "eval": OmegaConf.load(CONFIG_DIR / "eval" / f"{name}.yaml")})
    return OmegaConf.create(OmegaConf.to_container(root, resolve=True)).eval


def caption_records(tmp_path, n=3):
    records = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (32, 32), (40 * i, 255 - 40 * i, 90)).save(path, format="JPEG")
        records.append({"prompt": CAPTION_PROMPT, "answer": "a red square",
                        "references": ["a red square", "a square", "red", "a small square", "colour"],
                        "image": str(path)})
    return records


@pytest.fixture
def calls(monkeypatch):
    """Every `generate` call's settings; outputs are empty strings."""
    seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, **settings):
        seen.append(settings)
        return [""] * len(prompts)

    monkeypatch.setattr(generation, "generate", fake_generate)
    return seen


@pytest.mark.parametrize("name, expected", [
    ("official_sampling", {"do_sample": True, "top_k": 10, "top_p": 0.95, "temperature": 0.3, "seed": 7, "batch_size": 16}),
    ("greedy", {"do_sample": False, "top_k": None, "top_p": None, "temperature": None, "seed": 7, "batch_size": 16}),
])
def test_tasks_and_both_probes_decode_as_eval_says(tmp_path, calls, name, expected):
    gen_cfg = eval_config(name)
    CaptionProbe("flickr30k", caption_records(tmp_path)).evaluate(None, None, gen_cfg)
    CodeProbe("probe", mini_humaneval.probe_problems(2)).evaluate(None, None, gen_cfg)
    task = Task("t", "choice", train=[], eval=[], test=[{"prompt": "Q", "answer": "A"}], max_new_tokens=4)
    evaluate_task(None, None, task, gen_cfg)
    caption, code, task_call = calls
    for settings in (caption, code, task_call):
        assert {key: settings[key] for key in SAMPLING_KEYS} == expected
    assert task_call["max_prompt_len"] == 64  # task prompts are cut as in training ...
    assert code["max_prompt_len"] is None and caption["max_prompt_len"] is None  # ... a probe's are read whole


def test_caption_probe_samples_under_official_sampling(tmp_path):
    """On a real tiny LLaVA: greedy captions repeat; the authors' sampler gives other captions."""
    model, processor = build_tiny("llava", seed=0)
    probe = CaptionProbe("flickr30k", caption_records(tmp_path), max_new_tokens=12)
    greedy = [r["prediction"] for r in probe.evaluate(model, processor, eval_config("greedy"))[1]]
    again = [r["prediction"] for r in probe.evaluate(model, processor, eval_config("greedy"))[1]]
    sampled = [r["prediction"] for r in probe.evaluate(model, processor, eval_config("official_sampling"))[1]]
    assert greedy == again
    assert sampled != greedy


def test_probe_name_and_style_come_from_the_config():
    """`benchmark.probe.name` and `benchmark.probe.style` are read (they were dead or missing for trace)."""
    from piece_cl.benchmarks.registry import build_benchmark
    from piece_cl.benchmarks.trace import build_humaneval_probe

    trace = OmegaConf.create({"paths": {"humaneval_path": None},
                              "benchmark": {"probe": {"name": "he", "n_problems": 2, "style": "stop_sequences"}}})
    probe = build_humaneval_probe(trace)
    assert (probe.name, probe.style, len(probe.problems)) == ("he_pass@1", "stop_sequences", 2)
    tiny = OmegaConf.load(CONFIG_DIR / "benchmark" / "tiny.yaml")
    assert tiny.probe.style == "authors"
    tiny = OmegaConf.merge(tiny, {"train_size": 4, "eval_size": 2, "test_size": 2,
                                  "probe": {"name": "mh", "n_problems": 3, "style": "stop_sequences"}})
    probe = build_benchmark(OmegaConf.create({"benchmark": tiny})).probe
    assert (probe.name, probe.style, len(probe.problems)) == ("mh_pass@1", "stop_sequences", 3)
