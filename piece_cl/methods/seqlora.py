"""SeqLoRA: one LoRA adapter (peft) on q_proj/v_proj, trained across all tasks in turn.

r 8, α 32, dropout 0.1 (the paper); the learning rate is the model's `lora_lr`. On a multimodal model
only the language model's projections get adapters (`model.language_model`), never the vision tower.
The base weights never change: peft freezes them, and only `lora_` tensors reach the optimiser.

Cost: adapters of 2·r·d per targeted matrix (≈0.1% of the model at r 8 on q/v) plus their Adam state;
a step costs about a frozen forward/backward (no weight gradients of the base).
"""
from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from piece_cl.methods.base import Method, register_method


def lora_config(cfg, model: nn.Module) -> LoraConfig:
    """The configured LoRA, its targets restricted to the language model when `model` is multimodal."""
    names = "|".join(re.escape(m) for m in cfg.target_modules)
    multimodal = any(name.split(".")[-1] == "language_model" for name, _ in model.named_modules())
    scope = r".*language_model\..*\." if multimodal else r"(.*\.)?"
    return LoraConfig(r=int(cfg.r), lora_alpha=int(cfg.alpha), lora_dropout=float(cfg.dropout),
                      target_modules=f"{scope}({names})", bias="none")


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if "lora_" in name}


def load_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


@register_method
class SeqLoRA(Method):
    name = "seqlora"

    def setup(self, model: nn.Module) -> nn.Module:
        self.model = get_peft_model(model, lora_config(self.cfg, model))
        return self.model

    def state_dict(self) -> dict:
        return {"adapters": adapter_weights(self.model)}

    def load_state_dict(self, state: dict) -> None:
        load_adapter_weights(self.model, state.get("adapters", {}))
