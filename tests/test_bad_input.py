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

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from piece_cl.cli import CONFIG_DIR
from piece_cl.data.collate import collate, encode_all
from piece_cl.errors import PieceError
from piece_cl.io import DiskFullError, atomic_write_json, disk_full_errno
from piece_cl.models.loading import load_model
from tests.test_cli_errors import assert_no_finished_output, assert_refused, piece_run

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
    assert_refused(proc, "method.ratio must be in (0, 1], got 2")
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
