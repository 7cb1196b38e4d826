"""Load the model and tokenizer (or processor) a config names: the embedded miniature, a tiny random
member of a real family (`source: tiny_config`), a local directory, or the hub.

Hub downloads happen only when `model.download=true`; otherwise a missing model fails at once with
the key to set, instead of hanging on a network that a cluster node or this machine may not have.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch

from piece_cl.data.multimodal import is_multimodal
from piece_cl.errors import PieceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PieceError(f"unknown dtype '{name}' (model.dtype); known: {', '.join(DTYPES)}")
    return DTYPES[name]


def _locate(model_cfg) -> tuple[str, bool]:
    """(path or hub name, local_files_only). Raises when the weights are not reachable."""
    path = model_cfg.path
    if not path:
        raise PieceError(f"model '{model_cfg.name}' has no weights configured: set model.path=/path/to/local/copy")
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser()), True
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # a filesystem path, not a hub name
        raise PieceError(f"model '{model_cfg.name}': directory {path} not found; set model.path=/path/to/local/copy")
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    offline = hub_offline or not model_cfg.get("download", False)
    if model_cfg.get("download", False):
        _check_hub_reachable(model_cfg, path, hub_offline)
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise PieceError(
                f"model '{model_cfg.name}' not found: '{path}' is not a local directory nor in the Hugging Face cache; "
                f"set model.path=/path/to/local/copy (or model.download=true to fetch it from the hub)"
            )
    return path, offline


def _check_hub_reachable(model_cfg, path: str, hub_offline: bool, timeout_s: float = 3.0) -> None:
    """model.download=true on a machine that cannot reach the hub: refuse in seconds, not after the
    Hugging Face client's retries (about 50 s). Only a TCP connection is opened; nothing is fetched."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return  # already in the local cache: no network needed
    fix = f"download '{path}' on a machine with network access and set model.path=/path/to/local/copy"
    if hub_offline:
        raise PieceError(f"model.download=true but HF_HUB_OFFLINE is set, so '{path}' cannot be fetched; {fix}")
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise PieceError(f"model.download=true but the hub {host}:{port} cannot be reached ({err.strerror or err}); "
                         f"{fix}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def _check_local_dir(model_cfg, directory: Path) -> None:
    """A local checkpoint must have a readable config.json and tokenizer files: checked before any data loads."""
    config_file = directory / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict) or "model_type" not in config:
            raise ValueError("no 'model_type' in it")
    except (OSError, ValueError) as err:
        detail = "missing" if not config_file.exists() else str(err).splitlines()[0]
        raise PieceError(f"model '{model_cfg.name}': {config_file} is not a usable model config ({detail}); "
                         "point model.path at a complete Hugging Face checkpoint directory") from None
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise PieceError(f"model '{model_cfg.name}': {directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "copy the tokenizer files next to the weights")


def check_available(model_cfg) -> None:
    """Fail fast (before data loading) when pretrained weights cannot be found or their directory is incomplete."""
    if model_cfg.source == "pretrained":
        path, local_only = _locate(model_cfg)
        if Path(path).is_dir():
            _check_local_dir(model_cfg, Path(path))


def _prepare_tokenizer(tokenizer, name: str) -> None:
    """Left padding (batched generation) and a pad token (the EOS when the checkpoint has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise PieceError(f"tokenizer of '{name}' has neither a pad nor an eos token; add one to its files")
        tokenizer.pad_token = tokenizer.eos_token


def _apply_chat_template_flag(model_cfg, processor) -> None:
    """`model.chat_template` decides whether prompts go through the processor's template.

    The paper ran the language models on raw prompts; only the multimodal ones use a template, and
    dropping it from the processor is what makes the collator and generation use the raw prompt.
    """
    wants_template = bool(model_cfg.get("chat_template", False))
    if not is_multimodal(processor):
        if wants_template:
            raise PieceError(f"model '{model_cfg.name}': model.chat_template=true is supported for multimodal models "
                             "only (the language models run on raw prompts, as the authors ran them)")
        return
    if wants_template and not getattr(processor, "chat_template", None):
        raise PieceError(f"model '{model_cfg.name}' has no chat template in its processor; set model.chat_template=false")
    if not wants_template:
        processor.chat_template = None


def load_model(cfg):
    """(model, tokenizer) for language models, (model, processor) for multimodal ones (`model.multimodal`)."""
    model_cfg = cfg.model
    if model_cfg.source == "embedded":
        from piece_cl.models.pretrain import load_miniature

        return load_miniature(model_cfg, Path(cfg.paths.cache_dir).expanduser())
    dtype = torch_dtype(model_cfg.dtype)
    if model_cfg.source == "tiny_config":
        from piece_cl.models.families import build_tiny

        arch = dict(model_cfg.get("arch") or {})
        model, processor = build_tiny(model_cfg.family, arch, seed=int(model_cfg.get("init_seed", 0)), dtype=dtype)
    elif model_cfg.source == "pretrained":
        path, local_only = _locate(model_cfg)
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        try:
            if model_cfg.get("multimodal", False):
                processor = AutoProcessor.from_pretrained(path, local_files_only=local_only)
                model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=local_only)
            else:
                processor = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
        except (OSError, ValueError, KeyError) as err:  # damaged weights, unknown architecture, bad tokenizer file
            raise PieceError(f"model '{model_cfg.name}': {path} cannot be loaded ({str(err).strip().splitlines()[0][:200]}); "
                             "check model.path points at a complete checkpoint") from None
    else:
        raise PieceError(f"unknown model.source '{model_cfg.source}'; use embedded, pretrained or tiny_config")
    _prepare_tokenizer(getattr(processor, "tokenizer", processor), str(model_cfg.get("path") or model_cfg.name))
    _apply_chat_template_flag(model_cfg, processor)
    return model, processor
