"""What autograd keeps for the backward of one forward, counted by running the real forward on the meta device.

The model's own forward (and importance's own loss) runs on meta tensors of the real batch shape under
`saved_tensors_hooks`; every tensor saved for backward that is not a parameter (or a view of one) is
counted once. Importance additionally keeps each hooked module's input until its gradient arrives
(importance._PerSampleHooks), counted here by the same forward hooks' view of the inputs.

On meta, `scaled_dot_product_attention` would take its math path and save the T×T attention matrix that
the fused kernels a real run uses (flash on GPUs, the flash kernel on CPUs) never form; the call is
routed to the fused CPU kernel's meta implementation, which saves what they save (q, k, v, out, lse).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if key.shape[-3] != query.shape[-3]:  # grouped-query attention: the kernels see repeated heads
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, bool(is_causal or attn_mask is not None), scale=scale)
    return out


@contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _is_weight(tensor: torch.Tensor) -> bool:
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(tensor, nn.Parameter) or isinstance(base, nn.Parameter)


def saved_bytes(model: nn.Module, rows: int, tokens: int, trainable: set[str] | None,
                hooked: list[nn.Module] = ()) -> dict[str, int]:
    """Bytes saved for backward by one forward of `rows` × `tokens` on the meta `model`.

    `trainable`: the parameter names that require grad (a training step); None: importance — no
    parameter requires grad, the embedding output does, the loss is importance's own, and `hooked`
    modules keep their inputs. Returns {"saved": all saved tensors, "logits": those of vocabulary width}.
    """
    from piece_cl.importance import _answer_loss

    flags = {p: p.requires_grad for p in model.parameters()}
    seen: dict[int, int] = {}
    logits: dict[int, int] = {}
    vocab = model.get_output_embeddings().weight.shape[0]
    keep: list[torch.Tensor] = []  # keeps ids unique while counting

    def record(x: torch.Tensor) -> None:
        if _is_weight(x) or id(x) in seen:
            return
        keep.append(x)
        seen[id(x)] = x.numel() * x.element_size()
        if x.dim() >= 2 and x.shape[-1] == vocab:
            logits[id(x)] = seen[id(x)]

    def pack(x):
        if isinstance(x, torch.Tensor):
            record(x)
        return x

    handles = [m.register_forward_hook(lambda mod, args, out: record(args[0])) for m in hooked]
    embeddings = model.get_input_embeddings()
    if trainable is None:
        handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    ids = torch.zeros(rows, tokens, dtype=torch.long, device="meta")
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable is not None and name in trainable)
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.enable_grad():
            if trainable is None:
                _answer_loss(model, {"input_ids": ids, "labels": ids}, "sum", per_sample=True)
            else:
                model(input_ids=ids, labels=ids)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {"saved": sum(seen.values()), "logits": sum(logits.values())}
