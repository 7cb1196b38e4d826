"""The model a config names, at its real shapes, on the meta device: no weights, no GPU, no download.

Where the architecture comes from, first match wins: a local `model.path` directory's config.json, the
Hugging Face cache's config.json of the hub name, the published config.json fields of the paper models
(plan/published.py); `source: embedded` and `source: tiny_config` are built from the config group as
models/loading.py builds them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from piece_cl.errors import PieceError
from piece_cl.plan.published import PUBLISHED


def _config_json(model_cfg) -> tuple[dict, str] | None:
    path = model_cfg.get("path")
    if not path:
        return None
    local = Path(str(path)).expanduser() / "config.json"
    if local.is_file():
        return json.loads(local.read_text()), str(local)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(path), "config.json")
    except Exception:  # not a hub name (a missing local path): fall through to the published table
        cached = None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text()), cached
    if str(path) in PUBLISHED:
        return dict(PUBLISHED[str(path)]), f"published config.json of {path} (piece_cl/plan/published.py)"
    return None


def hf_config(model_cfg):
    """(transformers config, where it came from) of the model `model_cfg` (the `model` config group)."""
    from transformers import AutoConfig, LlamaConfig

    if model_cfg.source == "embedded":
        arch = dict(model_cfg.arch)
        return LlamaConfig(vocab_size=int(model_cfg.tokenizer.vocab_size), **arch), "model.arch (embedded miniature)"
    if model_cfg.source == "tiny_config":
        from piece_cl.models.families import tiny_config, tiny_processor

        arch = dict(model_cfg.get("arch") or {})
        processor = tiny_processor(model_cfg.family, arch)
        return tiny_config(model_cfg.family, getattr(processor, "tokenizer", processor), arch), "model.arch (tiny_config)"
    found = _config_json(model_cfg)
    if found is None:
        raise PieceError(f"model '{model_cfg.name}': no config.json for '{model_cfg.get('path')}' (not a local directory, "
                         "not in the Hugging Face cache, not a paper model); set model.path=/path/to/local/copy")
    fields, origin = found
    fields = {k: v for k, v in fields.items() if k not in ("architectures", "torch_dtype", "dtype")}
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise PieceError(f"{origin} has no model_type; is it a transformers config.json?")
    return AutoConfig.for_model(model_type, **fields), origin


def meta_model(model_cfg) -> tuple[nn.Module, str]:
    """The model class a run would build, on the meta device in the configured dtype, and its config's origin."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from piece_cl.models.loading import torch_dtype

    config, origin = hf_config(model_cfg)
    auto = AutoModelForImageTextToText if model_cfg.get("multimodal", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch_dtype(model_cfg.dtype))
    return model, origin


@dataclass(frozen=True)
class Counts:
    """Entry counts the plan's formulas need, read off the meta model."""

    total: int  # |θ|, embeddings included (what ratio × |θ| counts)
    eligible: int  # entries importance scores (method.exclude applied)
    non_embedding: int  # what dense methods train (freeze_embeddings)
    norms: int  # normalisation weights of the language model (the LayerNorm baseline)
    largest_linear: int  # entries of the largest eligible nn.Linear weight (the per-sample buffer)
    text_config: object  # the language model's transformers config

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V cache elements per token over all layers (times the dtype's bytes elsewhere)."""
        c = self.text_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return 2 * c.num_hidden_layers * kv_heads * head_dim


def count(model: nn.Module, exclude: list[str]) -> Counts:
    from piece_cl.importance import eligible_parameters
    from piece_cl.methods.layernorm import is_norm

    eligible = eligible_parameters(model, exclude=exclude) if exclude else eligible_parameters(model)
    eligible_ids = {id(p) for _, p in eligible}
    embedding = model.get_input_embeddings().weight
    linears = [m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in eligible_ids]
    config = model.config
    text = getattr(config, "text_config", None) or config
    return Counts(
        total=sum(p.numel() for p in model.parameters()),
        eligible=sum(p.numel() for _, p in eligible),
        non_embedding=sum(p.numel() for p in model.parameters() if p is not embedding),
        norms=sum(p.numel() for n, p in model.named_parameters() if is_norm(n)),
        largest_linear=max(linears, default=0),
        text_config=text,
    )
