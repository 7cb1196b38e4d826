"""SeqFT: fine-tune every eligible parameter on each task in turn — the forgetting baseline.

Cost: one model's worth of gradients and two of Adam state (the reference point of every ratio).
"""
from piece_cl.methods.base import Method, register_method


@register_method
class SeqFT(Method):
    name = "seqft"
