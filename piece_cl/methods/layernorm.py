"""LayerNorm: only the normalisation weights train; every other parameter stays bit-identical.

Norms of all five architectures: input/post-attention (Llama, Qwen3), pre/post-feedforward (Gemma2),
q/k norms (Qwen3), the final norm — matched by a module name containing "norm". Norms out of scope
(piece_cl/scope.py: a vision tower such as LLaVA's CLIP or Qwen3-VL's `visual`, unless `train_vision: true`)
stay frozen: the baseline tunes the language model.

Cost: Adam state for the norm weights only (≈0.01% of the model); a step still back-propagates
through every layer but forms no weight gradients for the linears.
"""
from __future__ import annotations

import re

from torch import nn

from piece_cl.methods.base import Method, register_method
from piece_cl.scope import out_of_scope

NORM_PATTERN = re.compile(r"(^|\.)[^.]*norm[^.]*\.(weight|bias)$", re.IGNORECASE)


def is_norm(name: str, method_cfg=None) -> bool:
    """A normalisation weight in scope (vision-tower norms are not, by default)."""
    return bool(NORM_PATTERN.search(name)) and not out_of_scope(name, method_cfg)


@register_method
class LayerNorm(Method):
    name = "layernorm"

    def setup(self, model: nn.Module) -> nn.Module:
        for name, param in model.named_parameters():
            param.requires_grad_(is_norm(name, self.cfg))
        return model
