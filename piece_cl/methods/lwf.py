"""LwF: distil the model as it was before the task into the model learning it (Li & Hoiem, 2017).

The teacher is a frozen copy taken in `before_task`; its logits are computed on the fly for each
micro-batch (no cache of the task's logits). Loss = ce_weight·CE + α·T²·KL(p_teacher ‖ p_student) at
temperature T, averaged over answer positions only — the positions whose next token carries a label,
shifted exactly like the CE. The authors' code used 0.5·CE and every position, prompt and padding
included (protocol=official_code: ce_weight 0.5, answer_only false).

The first task has no earlier task to protect; `from_first_task: true` distils from the base model there too.

Cost: + 1 × the model (the teacher, in the model's dtype, no gradients or optimiser state) and one
teacher forward per micro-batch (≈ +1/3 of a training step).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from piece_cl.data.collate import IGNORE_INDEX
from piece_cl.methods.base import Method, StageContext, StepMeans, register_method


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, temperature: float) -> Tensor:
    """T²·KL(teacher ‖ student) at temperature T, mean over the positions predicting a labelled token
    (every position when `labels` is None)."""
    student = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    if labels is None:
        kl = per_position.mean()
    else:
        keep = labels[:, 1:] != IGNORE_INDEX
        kl = (per_position * keep).sum() / keep.sum().clamp(min=1)
    return temperature**2 * kl


@register_method
class LwF(Method):
    name = "lwf"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.teacher = None
        self.tracked = StepMeans()

    def before_task(self, ctx: StageContext) -> None:
        self.teacher = None
        if ctx.t == 0 and not self.cfg.get("from_first_task", False):
            return
        self.teacher = copy.deepcopy(ctx.model).eval()
        self.teacher.requires_grad_(False)

    def loss(self, ctx: StageContext, batch: dict[str, Tensor], out) -> Tensor:
        ce = float(self.cfg.ce_weight) * out.loss
        if self.teacher is None:
            return ce
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"] if self.cfg.answer_only else None
        kd = distillation_loss(out.logits, teacher_logits, labels, float(self.cfg.temperature))
        self.tracked.add(ctx.engine.global_step, "lwf_kd", kd)
        return ce + float(self.cfg.alpha) * kd

    def step_scalars(self) -> dict[str, float]:
        return self.tracked.means() if self.teacher is not None else {}

    def after_task(self, ctx: StageContext) -> None:
        self.teacher = None  # free the copy before evaluation
