"""Pick the engine backend `trainer.engine` names; here so that neither backend imports the other."""
from __future__ import annotations

from torch import nn

from piece_cl.errors import PieceError
from piece_cl.training.engine import Engine, TorchEngine


def build_engine(cfg, model: nn.Module, tokenizer) -> Engine:
    engine = cfg.trainer.engine
    if engine == "torch":
        return TorchEngine(cfg.trainer, model, tokenizer)
    if engine == "deepspeed":
        from piece_cl.training.deepspeed_engine import DeepSpeedEngine  # imports deepspeed: only when chosen

        return DeepSpeedEngine(cfg.trainer, model, tokenizer)
    raise PieceError(f"unknown trainer.engine '{engine}'; known: torch, deepspeed")
