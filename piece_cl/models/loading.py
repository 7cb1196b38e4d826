"""Load the model and tokenizer a config names: the embedded miniature, a local directory, or the hub.

Hub downloads happen only when `model.download=true`; otherwise a missing model fails at once with
the key to set, instead of hanging on a network that a cluster node or this machine may not have.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

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
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not model_cfg.get("download", False)
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise PieceError(
                f"model '{model_cfg.name}' not found: '{path}' is not a local directory nor in the Hugging Face cache; "
                f"set model.path=/path/to/local/copy (or model.download=true to fetch it from the hub)"
            )
    return path, offline


def check_available(model_cfg) -> None:
    """Fail fast (before data loading) when pretrained weights cannot be found."""
    if model_cfg.source == "pretrained":
        _locate(model_cfg)


def load_model(cfg):
    """(model, tokenizer_or_processor) for `cfg.model`."""
    model_cfg = cfg.model
    if model_cfg.source == "embedded":
        from piece_cl.models.pretrain import load_miniature

        return load_miniature(model_cfg, Path(cfg.paths.cache_dir).expanduser())
    if model_cfg.source != "pretrained":
        raise PieceError(f"unknown model.source '{model_cfg.source}'; use embedded or pretrained")
    path, local_only = _locate(model_cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(model_cfg.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only, padding_side="left")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise PieceError(f"tokenizer of '{path}' has neither a pad nor an eos token; add one to its files")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    return model, tokenizer
