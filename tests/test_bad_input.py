"""The rest of the refusal catalogue: tokenizers without a pad token, a full disk, a ratio that selects no
parameter, a VQA record whose image is missing. Each gets one line, exit 2 and nothing that looks finished."""
import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from piece_cl.cli import CONFIG_DIR
from piece_cl.data.collate import collate, encode_all
from piece_cl.errors import PieceError
from piece_cl.io import DiskFullError, atomic_write_json, disk_full_errno
from piece_cl.models.loading import load_model
from tests.test_cli_errors import assert_no_finished_output, assert_refused, make_trace_root, piece_run, run_cli

# Seconds-long runs on the cached miniature (PIECE_CACHE_DIR, set by conftest and inherited by piece-run).
SMOKE = ["experiment=smoke", "benchmark.train_size=8", "benchmark.eval_size=4", "benchmark.test_size=4",
         "benchmark.probe.n_problems=1", "eval.probe_before=false"]
RECORDS = [{"prompt": "def add(a, b):", "answer": " return a + b"}, {"prompt": "x", "answer": " y z w"}]


def assert_no_run_dir(tmp_path):
    """Refused before anything finished: the run directory was removed, so nothing looks like a run."""
    assert_no_finished_output(tmp_path)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


# -- tokenizers without a pad token ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe():
    from piece_cl.models.tiny import build_tokenizer

    return build_tokenizer(["def add(a, b): return a + b", "hello world x y z w"] * 20, 300)


def save_pretrained_model(directory, bpe, **special_tokens):
    """A tiny Llama and a tokenizer carrying only `special_tokens`, as a local checkpoint directory."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe.backend_tokenizer, **special_tokens)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=None,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def pretrained_cfg(directory):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config",
                       overrides=["model=llama3_8b", f"model.path={directory}", "model.dtype=float32"])


def test_tokenizer_without_pad_pads_with_eos_and_a_batch_trains(tmp_path, bpe):
    directory = save_pretrained_model(tmp_path / "no_pad", bpe, eos_token="</s>")
    model, tokenizer = load_model(pretrained_cfg(directory))
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    batch = collate(encode_all(tokenizer, RECORDS, 32, 16), tokenizer.pad_token_id, side="right")
    short = int(batch["attention_mask"][1].sum())
    assert short < batch["input_ids"].shape[1]  # the second record really is padded, with EOS
    assert (batch["input_ids"][1, short:] == tokenizer.eos_token_id).all()
    assert torch.isfinite(model(**batch).loss)


def test_tokenizer_without_pad_or_eos_is_refused_naming_the_model(tmp_path, bpe):
    directory = save_pretrained_model(tmp_path / "bare", bpe)
    with pytest.raises(PieceError, match=f"tokenizer of '{directory}' has neither a pad nor an eos token"):
        load_model(pretrained_cfg(directory))
    proc = piece_run(tmp_path, "model=llama3_8b", f"model.path={directory}", "model.dtype=float32", *SMOKE)
    assert_refused(proc, str(directory), "neither a pad nor an eos token")
    assert_no_run_dir(tmp_path)


# -- a full disk ----------------------------------------------------------------------------------------
class FileSizeLimit:
    """RLIMIT_FSIZE on this process for the block (soft limit only, so it can be lifted again)."""

    def __init__(self, size: int):
        self.size = size

    def __enter__(self):
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, self.saved[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)


def test_full_disk_errors_name_the_file_and_leave_no_partial_file(tmp_path):
    from piece_cl.checkpoint import save_stage_state

    big = {"values": list(range(100_000))}
    with FileSizeLimit(100_000), pytest.raises(DiskFullError) as raised:
        atomic_write_json(tmp_path / "results.json", big)
    assert raised.value.errno == errno.EFBIG and raised.value.filename == str(tmp_path / "results.json")
    assert list(tmp_path.iterdir()) == []

    class Method:  # state large enough to hit the limit through torch.save, the model small enough to fit
        def state_dict(self):
            return {"fisher": torch.zeros(100_000)}

    class Engine:
        global_step = 3

    with FileSizeLimit(100_000), pytest.raises(DiskFullError) as raised:
        save_stage_state(tmp_path, 0, torch.nn.Linear(4, 4), Method(), Engine())
    assert raised.value.filename == str(tmp_path / "checkpoint" / "stage_0" / "method.pt")
    assert list((tmp_path / "checkpoint").iterdir()) == []  # the partial checkpoint is gone
    safetensors_error = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full_errno(safetensors_error) == errno.ENOSPC
    assert disk_full_errno(RuntimeError("unrelated (os error 2)")) is None


def under_file_size_limit(size: int):
    """preexec_fn for a piece-run whose writes beyond `size` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_full_disk_before_any_commit_is_one_line_and_leaves_no_run(tmp_path):
    """A 1 kB limit: config.yaml, the first file a run writes, does not fit."""
    proc = subprocess.run([sys.executable, "-m", "piece_cl.cli", *SMOKE], cwd=tmp_path, preexec_fn=under_file_size_limit(1000),
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PIECE_OUTPUT_ROOT": str(tmp_path / "outputs")},
                          capture_output=True, text=True, timeout=300)
    assert_refused(proc, "no space left on device while writing", "/config.yaml (File too large)",
                   "free space and rerun the same command (no stage was committed yet")
    assert_no_run_dir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("epoch_checkpoints,written", [
    ("true", "epochs_of_stage_1/weights.safetensors"),  # the epoch state comes first
    ("false", "stage_1/model.safetensors"),
])
def test_full_disk_mid_run_is_one_line_and_the_same_command_resumes(tmp_path, epoch_checkpoints, written):
    """Stage 0 is committed, then stage 1's first checkpoint file (3.4-3.6 MB) meets a 1 MB file-size limit."""
    run_dir = tmp_path / "outputs" / "run"
    command = [sys.executable, "-m", "piece_cl.cli", *SMOKE, "benchmark.tasks=[tiny_choice,tiny_number]",
               f"hydra.run.dir={run_dir}", f"trainer.epoch_checkpoints={epoch_checkpoints}"]

    def run(env_extra=None, preexec_fn=None):
        env = {key: value for key, value in os.environ.items() if key != "PIECE_KILL_AT"}
        return subprocess.run(command, cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1", **(env_extra or {})},
                              preexec_fn=preexec_fn, capture_output=True, text=True, timeout=300)

    killed = run({"PIECE_KILL_AT": "step@1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["stages_done"] == 1

    full = run(preexec_fn=under_file_size_limit(1 << 20))
    assert_refused(full, "no space left on device while writing",
                   str(run_dir / "checkpoint" / written), "File too large",
                   f"rerun the same command with hydra.run.dir={run_dir} to resume from the last committed stage (1/2)")
    assert json.loads((run_dir / "results.json").read_text())["stages_done"] == 1  # stage 1 is not claimed
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["stage_0"]  # no partial checkpoint

    resumed = run()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after stage 1/2" in resumed.stderr
    assert json.loads((run_dir / "results.json").read_text())["stages_done"] == 2


# -- a top-k ratio that selects nothing, or more than there is ----------------------------------------------
@pytest.mark.parametrize("ratio,fragment", [("1e-12", "selects nothing"), ("1", "are eligible")])
def test_ratio_selecting_none_or_too_many_is_refused_naming_the_key_and_count(tmp_path, ratio, fragment):
    proc = piece_run(tmp_path, "method=piece_s", f"method.ratio={ratio}", *SMOKE, "eval.probe_before=true")
    assert_refused(proc, fragment, f"method.ratio {ratio}", "parameters")
    total = int(re.search(r" x (\d+) parameters", proc.stderr).group(1))
    assert 800_000 < total < 1_000_000  # the miniature's |θ| (embeddings counted, as the authors did)
    assert "base model:" not in proc.stderr  # refused at setup, before the base-model probe
    assert_no_run_dir(tmp_path)


def test_ratio_above_one_is_refused_before_anything_loads(tmp_path):
    proc = piece_run(tmp_path, "method=piece_s", "method.ratio=2", env_extra={"PIECE_CACHE_DIR": str(tmp_path / "empty")})
    assert_refused(proc, "method.ratio must be a number in (0, 1], got 2")
    assert not (tmp_path / "empty").exists()  # the model was never looked for
    assert_no_run_dir(tmp_path)


# -- a VQA record whose image is missing ------------------------------------------------------------------------
def test_missing_vqa_image_is_refused_at_loading_naming_file_and_record(tmp_path, shared_data):
    train_file = shared_data / "vqa_v2" / "action" / "train.json"
    first, second = (record["pic_path"].rsplit("/", 1)[-1] for record in json.loads(train_file.read_text())[:2])
    coco = tmp_path / "coco"
    coco.mkdir()
    Image.new("RGB", (4, 4)).save(coco / first, format="JPEG")  # record 0 has its image, record 1 does not
    proc = piece_run(tmp_path, "model=tiny_llava", "benchmark=vqa", "benchmark.tasks=[action]",
                     "benchmark.train_size=2", f"paths.vqa_root={shared_data / 'vqa_v2'}", f"paths.coco_root={coco}",
                     f"paths.flickr30k_root={tmp_path}")
    assert_refused(proc, f"{train_file}: record 1: image {second} not found under paths.coco_root",
                   "benchmark.missing_images=skip")
    assert "task 1/" not in proc.stderr  # refused while loading, before any training
    assert_no_run_dir(tmp_path)


# -- the runner: never lose a run, never a wrong number as success (issue 13) ------------------------------
def make_earlier_run(tmp_path, name="earlier", results=False):
    """A killed run's directory as a user would have it: config, an epoch checkpoint, maybe a committed stage."""
    run_dir = tmp_path / "outputs" / name
    (run_dir / "checkpoint" / "epochs_of_stage_0").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 42\n")
    (run_dir / "checkpoint" / "epochs_of_stage_0" / "progress.json").write_text('{"epochs_done": 1}')
    if results:
        (run_dir / "results.json").write_text(json.dumps({"tasks": ["a", "b"], "R": [[1.0]], "stages_done": 1}))
    return run_dir


def snapshot(run_dir):
    """Every file and its bytes, except the (empty) .lock an attempt leaves."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def assert_intact(run_dir, before):
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("override,fragment", [
    ("trainer.epochs=1.5", "trainer.epochs must be an integer >= 1, got 1.5"),
    ("benchmark.probe.timeout=-1", "benchmark.probe.timeout must be a number > 0, got -1"),
    ("method=piece_s method.ratio=abc", "method.ratio must be a number in (0, 1], got 'abc'"),
    ("seed=-1", "seed must be an integer >= 0, got -1"),
    ("trainer.batch_size=big", "trainer.batch_size must be an integer >= 1, got 'big'"),
    ("eval.batch_size=0", "eval.batch_size must be an integer >= 1, got 0"),
    ("benchmark.probe.n_problems=0", "benchmark.probe.n_problems must be an integer >= 1 (or null), got 0"),
    ("benchmark.tasks=[]", "benchmark.tasks must be a non-empty list of task names, got []"),
    ("model.epochs=2.5", "model.epochs must be an integer >= 1, got 2.5"),
    ("trainer.shuffle=maybe", "trainer.shuffle must be true or false, got 'maybe'"),
    ("method=piece_s protocol=official_code benchmark=trace benchmark.importance.batch_size.FOMC=0",
     "benchmark.importance.batch_size must be an integer >= 1, or a {task: value} mapping of such"),
])
def test_wrong_typed_or_ranged_keys_are_refused_and_an_interrupted_run_is_kept(tmp_path, monkeypatch, capsys,
                                                                                override, fragment):
    """The same hydra.run.dir as a killed run, with a refused override: the run's files stay as they were."""
    run_dir = make_earlier_run(tmp_path)
    before = snapshot(run_dir)
    proc = run_cli(tmp_path, monkeypatch, capsys, *override.split(), f"hydra.run.dir={run_dir}")
    assert_refused(proc, fragment)
    assert_intact(run_dir, before)


def test_a_refusal_removes_only_the_empty_directory_this_attempt_made(tmp_path, monkeypatch, capsys):
    earlier = make_earlier_run(tmp_path, results=True)
    before = snapshot(earlier)
    empty = tmp_path / "outputs" / "made_by_the_user"
    empty.mkdir()
    proc = run_cli(tmp_path, monkeypatch, capsys, "seed=-1", f"hydra.run.dir={empty}")
    assert_refused(proc, "seed must be")
    assert empty.is_dir()  # existed before this attempt: not ours to remove
    proc = run_cli(tmp_path, monkeypatch, capsys, "seed=-1")
    assert_refused(proc, "seed must be")
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["earlier", "made_by_the_user"]
    assert_intact(earlier, before)


def test_a_second_run_into_a_locked_directory_is_refused_and_touches_nothing(tmp_path, monkeypatch, capsys):
    from piece_cl.rundir import RunDirLock

    run_dir = make_earlier_run(tmp_path)
    before = snapshot(run_dir)
    with RunDirLock(run_dir):  # as a running piece-run holds it
        proc = run_cli(tmp_path, monkeypatch, capsys, f"hydra.run.dir={run_dir}", "method=piece_s")
    assert_refused(proc, f"another piece-run is using {run_dir}", "choose another hydra.run.dir")
    assert_intact(run_dir, before)


def test_unknown_key_is_one_line(tmp_path, monkeypatch, capsys):
    proc = run_cli(tmp_path, monkeypatch, capsys, "trainer.epoch=2")
    assert_refused(proc, "unknown config key 'trainer.epoch'", "+trainer.epoch=")
    assert not (tmp_path / "outputs").exists()


def test_multirun_goes_on_after_a_refused_job_and_lists_the_refused(tmp_path, monkeypatch, capsys):
    proc = run_cli(tmp_path, monkeypatch, capsys, "-m", "eval.batch_size=0,-3")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("piece-run: error: ")]
    assert "job 0 (eval.batch_size=0): eval.batch_size must be" in lines[0]
    assert "job 1 (eval.batch_size=-3): eval.batch_size must be" in lines[1]  # the sweep went on
    assert lines[-1] == ("piece-run: error: 2 job(s) of the multirun were refused: job 0 (eval.batch_size=0); "
                         "job 1 (eval.batch_size=-3)")
    assert "Traceback" not in proc.stderr


def test_corrupted_results_and_config_are_refused_naming_the_file(tmp_path, monkeypatch, capsys):
    run_dir = make_earlier_run(tmp_path, results=True)
    (run_dir / "results.json").write_text('{"tasks": ["a", "b"], "R": [[1.0]')
    before = snapshot(run_dir)
    proc = run_cli(tmp_path, monkeypatch, capsys, f"hydra.run.dir={run_dir}")
    assert_refused(proc, f"{run_dir / 'results.json'} is corrupted", "new hydra.run.dir")
    assert_intact(run_dir, before)

    run_dir = make_earlier_run(tmp_path, name="bad_config", results=True)
    (run_dir / "config.yaml").write_bytes(b"seed: [1\n\xff")
    before = snapshot(run_dir)
    proc = run_cli(tmp_path, monkeypatch, capsys, f"hydra.run.dir={run_dir}")
    assert_refused(proc, f"{run_dir / 'config.yaml'} is corrupted", "1 committed stage(s) are kept",
                   "restore config.yaml")
    assert_intact(run_dir, before)


SMOKE2 = [*SMOKE, "benchmark.tasks=[tiny_choice,tiny_number]", "trainer.epoch_checkpoints=false"]


def test_ctrl_c_after_a_commit_is_one_line_and_a_damaged_stage_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    """Ctrl-C after stage 1 was committed: one line saying how to resume, files kept; then a stage checkpoint
    whose method state is garbage is refused on resume, naming the file, with the files kept."""
    from piece_cl import run as run_module
    from piece_cl.checkpoint import stage_checkpoint
    from piece_cl.results import RunResults

    run_dir = tmp_path / "outputs" / "run"

    def commit_one_stage_then_interrupt(cfg, directory):
        results = RunResults(run="r", model="tiny", method="seqft", benchmark="tiny",
                             tasks=["tiny_choice", "tiny_number"], probe_name=None)
        results.add_stage([50.0], None)
        stage = stage_checkpoint(directory, 0)
        stage.mkdir(parents=True)
        (stage / "method.pt").write_bytes(b"not a pickle")
        (stage / "model.safetensors").write_bytes(b"\0" * 16)
        (stage / "engine.json").write_text('{"global_step": 3}')
        results.save(directory)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "run", commit_one_stage_then_interrupt)
        proc = run_cli(tmp_path, monkeypatch, capsys, *SMOKE2, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"piece-run: error: interrupted; rerun the same command with "
                                                    f"hydra.run.dir={run_dir} to resume")
    assert "Traceback" not in proc.stderr
    assert not list(run_dir.rglob("*.tmp"))
    before = snapshot(run_dir)

    proc = run_cli(tmp_path, monkeypatch, capsys, *SMOKE2, f"hydra.run.dir={run_dir}")
    assert_refused(proc, f"{stage_checkpoint(run_dir, 0) / 'method.pt'} is unreadable",
                   "stage 1's checkpoint is the only copy", "start again in a new hydra.run.dir")
    assert_intact(run_dir, before)


def test_ctrl_c_before_any_commit_removes_the_attempts_directory(tmp_path, monkeypatch, capsys):
    from piece_cl import run as run_module

    def interrupt(cfg, directory):
        (directory / "stage_0_tiny_choice").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run", interrupt)
    proc = run_cli(tmp_path, monkeypatch, capsys, *SMOKE)
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines()[-1] == ("piece-run: error: interrupted before anything was committed; "
                                                    "rerun the same command to start again")
    assert not any((tmp_path / "outputs").iterdir())


class Method:
    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"fisher": torch.ones(3)}

    def load_state_dict(self, state):
        self.loaded = state


class Engine:
    global_step = 0


@pytest.mark.parametrize("damage,file", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10]), "model.safetensors"),
    (lambda d: (d / "engine.json").write_text('{"step": 3}'), "engine.json"),
    (lambda d: (d / "method.pt").write_bytes((d / "method.pt").read_bytes()[:20]), "method.pt"),
    (lambda d: (d / "method.pt").unlink(), "method.pt"),
])
def test_every_damaged_stage_file_is_one_line_naming_it(tmp_path, damage, file):
    from piece_cl.checkpoint import load_stage_state, save_stage_state, stage_checkpoint

    model = torch.nn.Linear(4, 4)
    save_stage_state(tmp_path, 0, model, Method(), Engine())
    damage(stage_checkpoint(tmp_path, 0))
    with pytest.raises(PieceError, match=re.escape(f"{stage_checkpoint(tmp_path, 0) / file} is unreadable")) as raised:
        load_stage_state(tmp_path, 0, torch.nn.Linear(4, 4), Method(), Engine())
    assert "\n" not in str(raised.value) and "cannot be resumed" in str(raised.value)


@pytest.mark.parametrize("file", ["weights.safetensors", "method.pt", "progress.json", "rng.pt"])
def test_a_damaged_epoch_checkpoint_says_to_delete_it_and_restart_the_stage(tmp_path, file):
    from piece_cl.training.epoch_state import EpochState, load_epoch_state, save_epoch_state

    model = torch.nn.Linear(4, 4)
    params = list(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    directory = tmp_path / "epochs_of_stage_1"
    save_epoch_state(directory, EpochState(1, [0.5], 3), Method(), params, optimizer, finished=False)
    path = directory / file
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(PieceError, match=re.escape(f"{path} is unreadable")) as raised:
        load_epoch_state(directory, Method(), params, optimizer)
    assert f"delete {directory} and rerun the same command" in str(raised.value)


# -- bad task files: file and record named, one line -------------------------------------------------------
@pytest.mark.parametrize("name,content,fragments", [
    ("train.json", b'[{"prompt": "p", "answer": "a"},\n {"prompt": "caf\xe9", "answer": "a"}]',
     ["train.json: line 2 (byte", "not UTF-8"]),
    ("train.json", json.dumps([{"prompt": "p", "answer": "a"}, {"prompt": "x\ud800y", "answer": "a"}]).encode(),
     ["train.json: record 1 field 'prompt' holds a lone surrogate"]),
    ("train.json.gz", b'[{"prompt": "p", "answer": "a"}]', ["train.json.gz: not a valid gzip file"]),
    ("train.json", b"[" * 100_000 + b"]" * 100_000, ["train.json: JSON is nested too deeply"]),
    ("train.jsonl", b'{"prompt": "p", "answer": "a"}\n' + b"[" * 100_000, ["train.jsonl: JSON on line 2 is nested too deeply"]),
])
def test_bad_task_files_name_file_and_record(tmp_path, name, content, fragments):
    from piece_cl.data.records import load_records

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PieceError) as raised:
        load_records(path)
    assert "\n" not in str(raised.value)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_a_bad_task_file_through_piece_run_is_one_line_and_keeps_an_earlier_run(tmp_path, monkeypatch, capsys):
    earlier = make_earlier_run(tmp_path, results=True)
    before = snapshot(earlier)
    root = make_trace_root(tmp_path, train='[{"prompt": "x\\ud800", "answer": "a"}]')
    proc = run_cli(tmp_path, monkeypatch, capsys, "benchmark=trace", "benchmark.tasks=[C-STANCE]",
                   f"paths.trace_root={root}")
    assert_refused(proc, f"{root / 'C-STANCE' / 'train.json'}: record 0 field 'prompt' holds a lone surrogate")
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["earlier"]
    assert_intact(earlier, before)


@pytest.mark.parametrize("key", ["PIECE_OUTPUT_ROOT", "PIECE_CACHE_DIR"])
def test_unwritable_output_or_cache_dir_is_one_line_naming_it(tmp_path, monkeypatch, capsys, key):
    """/sys refuses mkdir even to root (EPERM), as a read-only or foreign directory would."""
    proc = run_cli(tmp_path, monkeypatch, capsys, *SMOKE, env_extra={key: "/sys/piece_cl_unwritable"})
    assert_refused(proc, "cannot write or read /sys/piece_cl_unwritable", "Operation not permitted", "make it writable")
    if key == "PIECE_CACHE_DIR":
        assert not any((tmp_path / "outputs").iterdir())  # the attempt's own run directory is gone


# -- the miniature cache is verified against its manifest ----------------------------------------------------
@pytest.fixture()
def cache_copy(tmp_path):
    """A copy of the miniature cache that conftest's session fixture pretrained (the shared one is never touched)."""
    import shutil

    from piece_cl.models.pretrain import cache_entry

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    source = cache_entry(cfg.model, os.environ["PIECE_CACHE_DIR"])
    assert (source / "model.safetensors").is_file(), f"{source} was not pretrained before the tests"
    target = tmp_path / "cache" / "miniature" / source.name
    shutil.copytree(source, target)
    return cfg, tmp_path / "cache", target


def drop_a_tensor(directory):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    tensors.pop(sorted(tensors)[-1])
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("damage,fragment", [
    (drop_a_tensor, "model.safetensors has"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda d: (d / "manifest.json").write_text("{"), "unreadable manifest.json"),
])
def test_a_damaged_miniature_cache_is_refused_naming_the_directory(cache_copy, damage, fragment):
    from piece_cl.models.manifest import has_manifest, write_manifest
    from piece_cl.models.pretrain import load_miniature

    cfg, cache_dir, target = cache_copy
    if not has_manifest(target):
        write_manifest(target)
    load_miniature(cfg.model, cache_dir)  # intact: loads
    damage(target)
    with pytest.raises(PieceError, match=re.escape(f"cached model {target}")) as raised:
        load_miniature(cfg.model, cache_dir)
    assert fragment in str(raised.value) and f"delete {target} and rerun" in str(raised.value)


def test_a_cache_without_manifest_missing_a_tensor_is_refused_not_loaded_with_random_weights(cache_copy):
    from piece_cl.models.manifest import MANIFEST
    from piece_cl.models.pretrain import load_miniature

    cfg, cache_dir, target = cache_copy
    (target / MANIFEST).unlink(missing_ok=True)
    drop_a_tensor(target)
    with pytest.raises(PieceError, match="does not hold every weight"):
        load_miniature(cfg.model, cache_dir)
    assert not (target / MANIFEST).exists()


# -- model directories and the hub ------------------------------------------------------------------------
def test_model_dir_with_broken_config_or_no_tokenizer_is_refused_before_data_loads(tmp_path, bpe, monkeypatch, capsys):
    directory = save_pretrained_model(tmp_path / "model", bpe, eos_token="</s>")
    (directory / "config.json").write_text('{"model_type": "llama", ')
    nowhere = tmp_path / "no_trace_here"  # the data is never reached: the model is checked first
    overrides = ["model=llama3_8b", f"model.path={directory}", "benchmark=trace", f"paths.trace_root={nowhere}"]
    proc = run_cli(tmp_path, monkeypatch, capsys, *overrides)
    assert_refused(proc, f"{directory / 'config.json'} is not a usable model config")
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "tokenizer.json").unlink()
    proc = run_cli(tmp_path, monkeypatch, capsys, *overrides)
    assert_refused(proc, f"{directory} has no tokenizer")
    assert not any((tmp_path / "outputs").iterdir())


@pytest.mark.parametrize("env,fragment", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "the hub 127.0.0.1:9 cannot be reached"),
])
def test_download_true_without_a_hub_is_refused_in_seconds(tmp_path, monkeypatch, capsys, env, fragment):
    import time

    started = time.perf_counter()
    proc = run_cli(tmp_path, monkeypatch, capsys, "model=llama3_8b", "model.download=true", "benchmark=trace",
                   env_extra={"HF_HOME": str(tmp_path / "hf"), **env})
    assert_refused(proc, fragment, "set model.path=")
    assert time.perf_counter() - started < 40  # composition included; the hub's retries took about 50 s


def test_piece_report_on_a_truncated_mask_is_one_line(tmp_path, capsys):
    from piece_cl.report.masks import load_mask
    from safetensors.numpy import save_file
    import numpy as np

    path = tmp_path / "mask.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": np.arange(100, dtype=np.int64)}, str(path))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(PieceError, match=re.escape(f"{path} is not a readable mask")):
        load_mask(path)
