"""O-LoRA: a new LoRA per task, kept orthogonal to the earlier ones (Wang et al., 2023; paper Eq. 22).

Task t trains a fresh peft adapter `task_t` (A random, B = 0, so the model starts the task exactly as
the previous one ended); earlier adapters stay active in the forward pass but frozen. Loss =
CE + γ Σ_{i<t} ‖A_i A_tᵀ‖²_F summed over the targeted layers (γ 0.5); the authors' code used the L1 sum
Σ|A_i A_tᵀ| (protocol=official_code: penalty l1). The model evaluated is W0 + Σ_t B_t A_t (times
peft's α/r): all adapters active, which is the merged weight without a merged copy.

Adapters are new parameters, so the optimiser built for task t holds no state from before it (the
authors' re-initialisation was likely undone by the fp32 master copy, docs/paper-notes.md §3).

Several peft adapters active with one trainable works through `base_model.set_adapter([...])`
followed by freezing the earlier ones (peft's set_adapter marks every active adapter trainable).

Cost: t adapters of 2·r·d per targeted matrix (each ≈0.1% of the model), Adam state for the newest;
the forward runs t LoRA branches; the penalty is (t−1) r×r products per layer.
"""
from __future__ import annotations

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from piece_cl.errors import PieceError
from piece_cl.methods.base import Method, StageContext, register_method
from piece_cl.methods.seqlora import adapter_weights, load_adapter_weights, lora_config


def adapter_name(t: int) -> str:
    return f"task_{t}"


def orthogonality(old: Tensor, new: Tensor, penalty: str) -> Tensor:
    """‖A_old A_newᵀ‖²_F (the paper) or Σ|A_old A_newᵀ| (the authors' code) for A of shape r×d."""
    product = old @ new.T
    if penalty == "frobenius":
        return product.pow(2).sum()
    if penalty == "l1":
        return product.abs().sum()
    raise PieceError(f"method.penalty must be 'frobenius' or 'l1', got {penalty!r}")


@register_method
class OLoRA(Method):
    name = "olora"
    zero3_blocker = "its orthogonality penalty reads whole LoRA A matrices in the loss"

    def setup(self, model: nn.Module) -> nn.Module:
        self.model = get_peft_model(model, lora_config(self.cfg, model), adapter_name=adapter_name(0))
        self.adapters = [adapter_name(0)]
        return self.model

    def _use_adapters(self, count: int) -> None:
        """Adapters task_0..task_{count-1} exist and are active; only the last one trains."""
        config = lora_config(self.cfg, self.model)
        for t in range(len(self.adapters), count):
            self.model.add_adapter(adapter_name(t), config)
            self.adapters.append(adapter_name(t))
        self.model.base_model.set_adapter(self.adapters[:count])
        newest = f".{self.adapters[count - 1]}."
        for name, param in self.model.named_parameters():
            param.requires_grad_("lora_" in name and newest in name)

    def before_task(self, ctx: StageContext) -> None:
        self._use_adapters(ctx.t + 1)

    def loss(self, ctx: StageContext, batch, out) -> Tensor:
        if len(self.adapters) < 2:
            return out.loss
        new, older = self.adapters[-1], self.adapters[:-1]
        terms = [orthogonality(layer.lora_A[old].weight, layer.lora_A[new].weight, self.cfg.penalty)
                 for layer in self.model.modules() if isinstance(layer, LoraLayer) for old in older]
        return out.loss + float(self.cfg.gamma) * torch.stack(terms).sum()

    def state_dict(self) -> dict:
        return {"count": len(self.adapters), "adapters": adapter_weights(self.model)}

    def load_state_dict(self, state: dict) -> None:
        self._use_adapters(int(state.get("count", 1)))
        load_adapter_weights(self.model, state.get("adapters", {}))
