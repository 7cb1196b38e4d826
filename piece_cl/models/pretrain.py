"""Give the miniature a general skill to lose: pretrain it once on mini-HumanEval, cache the result.

The cache directory is keyed by a hash of everything that determines the pretrained weights (the
architecture, tokenizer and pretraining settings of the model config, and the data version), so
changing the fine-tuning learning rate reuses it while changing a layer count does not. It is
written to a temporary directory and renamed into place, so a crash or a concurrent run never
leaves a half-written model behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from piece_cl.data import mini_humaneval, tiny_tasks
from piece_cl.errors import PieceError
from piece_cl.io import writing
from piece_cl.models import manifest
from piece_cl.models.tiny import build_tiny_model, build_tokenizer


def cache_key(model_cfg: DictConfig) -> str:
    """Hash of the parts of the model config (plus data version) that decide the pretrained weights."""
    node = OmegaConf.to_container(model_cfg, resolve=True)
    keyed = {k: node.get(k) for k in ("arch", "tokenizer", "pretrain", "dtype")}
    keyed["data"] = mini_humaneval.DATA_VERSION
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def cache_entry(model_cfg: DictConfig, cache_dir: str | Path) -> Path:
    """The directory under cache_dir that holds (or will hold) this config's pretrained miniature."""
    return Path(cache_dir) / "miniature" / cache_key(model_cfg)


def is_pretrained(model_cfg: DictConfig, cache_dir: str | Path) -> bool:
    """Whether loading this config's miniature from cache_dir would skip pretraining."""
    return _cached(cache_entry(model_cfg, cache_dir))


def load_miniature(model_cfg: DictConfig, cache_dir: str | Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The pretrained miniature, from the cache when present, else pretrained now and cached."""
    target = cache_entry(model_cfg, cache_dir)
    if not _cached(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with _pretraining_lock(target):  # concurrent runs (multirun, test workers) pretrain once
            if not _cached(target):
                _pretrain_into(target, model_cfg)
    return _load_verified(target, model_cfg)


def _cached(target: Path) -> bool:
    return target.is_dir() and any(target.iterdir())


@contextlib.contextmanager
def _pretraining_lock(target: Path):
    """An exclusive flock beside the cache entry, held while one process pretrains it."""
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pretrain_into(target: Path, model_cfg: DictConfig) -> None:
    """Pretrain, write into a staging directory, manifest last, then rename into place."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model, tokenizer = pretrain(model_cfg)
        with writing(target):  # a full disk names the cache, not the temporary staging directory
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            manifest.write_manifest(staging)  # last: a directory without it was never completed
        os.rename(staging, target)  # atomic; fails if another run cached the same key first
    except OSError:
        if not manifest.has_manifest(target):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_verified(target: Path, model_cfg: DictConfig) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load the cache only when it matches its manifest and every weight was found in it.

    A cache from before manifests existed is accepted when it loads with no missing or unexpected
    tensor, and gets its manifest then (when the directory is writable).
    """
    delete = f"delete {target} and rerun (it is pretrained again)"
    legacy = not manifest.has_manifest(target)
    if not legacy:
        manifest.verify(target)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(target)
        model, info = LlamaForCausalLM.from_pretrained(target, dtype=getattr(torch, model_cfg.get("dtype", "float32")),
                                                       output_loading_info=True)
    except Exception as err:  # a damaged file of a cache without a manifest
        raise PieceError(f"cached model {target} cannot be loaded ({str(err).splitlines()[0][:200]}); {delete}") from None
    wrong = info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys")
    if wrong:
        raise PieceError(f"cached model {target} does not hold every weight (e.g. {sorted(wrong)[0]}); {delete}")
    if legacy:
        try:
            manifest.write_manifest(target)
        except OSError:
            pass  # a read-only shared cache stays usable; it is checked by loading as above
    return model, tokenizer


def _encode(tokenizer, problem: dict) -> tuple[list[int], list[int]]:
    """Ids and labels: prompt and solution tokenised separately, as generation sees them, then EOS.

    Only the solution (and EOS) is scored: a 0.9M model spends its capacity on reading the
    docstring into the body instead of on predicting the docstring itself.
    """
    prompt = tokenizer(problem["prompt"])["input_ids"]
    answer = tokenizer(problem["canonical_solution"])["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


@contextlib.contextmanager
def _one_thread():
    """torch at one intra-op thread, restored afterwards.

    The miniature's matrices are too small for a second thread to help (82 s at one or two here), but the
    thread count changes the summation order and so the pretrained weights (base probe 100.0 at one
    thread, 97.5 at two, AVX512): at one thread they depend on the CPU alone. It also cannot stall beside
    another busy process (a two-thread pretraining took 1,008 s instead of 82 s next to one).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain(model_cfg: DictConfig) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Train a fresh miniature on mini-HumanEval training problems (prompt → solution, loss on the solution)."""
    with _one_thread():
        return _pretrain(model_cfg)


def _pretrain(model_cfg: DictConfig) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    settings = model_cfg.pretrain
    torch.manual_seed(settings.seed)
    problems = mini_humaneval.training_problems(settings.problems, seed=settings.seed)
    corpus = [mini_humaneval.as_lm_text(p) for p in problems] + tiny_tasks.tokenizer_corpus()
    tokenizer = build_tokenizer(corpus, model_cfg.tokenizer.vocab_size)
    model = build_tiny_model(OmegaConf.to_container(model_cfg.arch, resolve=True), tokenizer)
    sequences = [_encode(tokenizer, p) for p in problems]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / settings.steps))))
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    started, loss = time.perf_counter(), float("nan")
    columns = [TextColumn("pretraining miniature"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
               TimeRemainingColumn()]
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("pretrain", total=settings.steps, loss="-")
        for step, batch in zip(range(settings.steps), _length_bucketed_batches(sequences, settings.batch_size, generator)):
            input_ids, labels = _pad(batch, tokenizer.pad_token_id)
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(bar, advance=1, loss=f"{loss.item():.3f}")
    print(f"pretrained miniature: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{settings.steps} steps on {len(problems)} mini-HumanEval problems, final loss {loss.item():.3f}, "
          f"{time.perf_counter() - started:.0f}s")
    model.eval()
    return model, tokenizer


def _length_bucketed_batches(sequences: list[tuple[list[int], list[int]]], batch_size: int, generator: torch.Generator,
                             bucket: int = 16):
    """Endless random batches of similar lengths (less padding: CPU time is the budget here)."""
    while True:
        drawn = torch.randint(len(sequences), (batch_size * bucket,), generator=generator).tolist()
        drawn.sort(key=lambda i: len(sequences[i][0]))
        chunks = [drawn[i:i + batch_size] for i in range(0, len(drawn), batch_size)]
        for c in torch.randperm(len(chunks), generator=generator).tolist():
            yield [sequences[i] for i in chunks[c]]


def _pad(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on padding; causal attention needs no mask then)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    for row, (ids, scored) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(scored)
    return input_ids, labels
