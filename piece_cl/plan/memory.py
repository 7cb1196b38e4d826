"""Predicted peak bytes per rank of each phase (importance, training step, evaluation) of a composed config.

Each phase's peak is a sum of named parts: the weights, the state the method and engine keep (their
sizes follow the code: SparseMaskedAdam's k-entry buffers, torch AdamW's two moments in the parameter's
dtype, ZeRO's partitions, importance's fp32 Σg/Σg²), the activations autograd saves (counted on the meta
device, plan/activations.py, times a calibrated factor) and the largest transient buffer. Parts that
live in host memory (ZeRO-Offload, host-side importance moments, EWC/GEM state on "cpu") are kept apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from piece_cl.importance import moment_bytes
from piece_cl.plan import calibration
from piece_cl.plan.activations import saved_bytes
from piece_cl.plan.shapes import Counts, count

GB = 1e9
PER_SAMPLE_BUFFER_BYTES = 1 << 28  # importance._PER_SAMPLE_BUFFER_BYTES
IMPORTANCE_METHODS = {"piece_f": "fisher", "piece_s": "s"}
DENSE_METHODS = ("seqft", "ewc", "gem", "lwf", "replay", "replay_online", "migu")
LORA_METHODS = ("seqlora", "olora")


@dataclass
class Phase:
    name: str
    parts: dict[str, float] = field(default_factory=dict)  # device bytes
    host: dict[str, float] = field(default_factory=dict)  # host bytes (offloads)
    note: str = ""

    @property
    def peak(self) -> float:
        return sum(self.parts.values())


@dataclass
class Layout:
    """What of the config decides memory: the engine, ranks, dtype and the batch shapes."""

    engine: str
    world: int
    dtype_bytes: int
    bf16_master: bool  # DeepSpeed bf16: fp32 master weights in the optimiser
    zero_stage: int
    offload_optimizer: bool
    micro_batch: int
    tokens: int  # max_prompt_len + max_answer_len: the longest training sequence
    eval_batch: int
    eval_prompt: int
    eval_new: int
    tasks: int

    @classmethod
    def from_cfg(cls, cfg, on_gpu: bool) -> "Layout":
        trainer = cfg.trainer
        deepspeed = trainer.engine == "deepspeed"
        world = int(trainer.get("nproc_per_node", 1)) * int(trainer.get("nnodes", 1)) if deepspeed else 1
        bf16 = str(trainer.get("bf16", "auto")).lower()
        ds_bf16 = deepspeed and (bf16 == "true" or (bf16 == "auto" and on_gpu))
        dtype = torch.bfloat16 if ds_bf16 else _dtype(cfg.model.dtype)
        benchmark = cfg.get("benchmark", {}) or {}
        return cls(engine=str(trainer.engine), world=world, dtype_bytes=torch.finfo(dtype).bits // 8,
                   bf16_master=ds_bf16, zero_stage=int(trainer.get("zero_stage", 0)) if deepspeed else 0,
                   offload_optimizer=bool(trainer.get("offload_optimizer", False)) if deepspeed else False,
                   micro_batch=int(trainer.micro_batch_size),
                   tokens=int(trainer.max_prompt_len) + int(trainer.max_answer_len),
                   eval_batch=int(cfg.eval.batch_size), eval_prompt=int(cfg.eval.max_prompt_len),
                   eval_new=int(trainer.max_answer_len), tasks=len(benchmark.get("tasks", []) or [1]))


def _dtype(name: str) -> torch.dtype:
    from piece_cl.models.loading import torch_dtype

    return torch_dtype(str(name))


def top_k(ratio: float, total: int) -> int:
    """k = floor(ratio × |θ|), as importance.top_k_size computes it."""
    return math.floor(Fraction(str(ratio)) * total)


def _largest(batch_size) -> int:
    """A per-task table of batch sizes (protocol=official_code) or one size: the largest."""
    values = batch_size.values() if hasattr(batch_size, "values") else [batch_size]
    return max(int(v) for v in values)


_SAVED: dict[int, dict] = {}  # id(meta model) -> (rows, tokens, kind, method) -> saved bytes: re-plans reuse them


def sparse_adam_bytes(k: int, weights_fp32: bool) -> float:
    """SparseMaskedAdam's flat fp32 buffers: gradient, two moments, and a master copy unless weights are fp32."""
    return k * 4 * (3 if weights_fp32 else 4) + k * 8  # + the int64 indices of the mask


def per_sample_buffer(largest_linear: int, chunk: int) -> float:
    """importance._PerSampleHooks._linear's bmm output for the largest layer, plus its sum over samples."""
    step = max(1, PER_SAMPLE_BUFFER_BYTES // max(1, largest_linear * 4))
    return (min(step, chunk) + 1) * largest_linear * 4


class Planner:
    """Phase predictions for one config; the meta model is built once."""

    def __init__(self, cfg, on_gpu: bool = True, model: nn.Module | None = None):
        from piece_cl.plan.shapes import meta_model

        self.cfg, self.on_gpu = cfg, on_gpu  # on_gpu False: predict a CPU process's RSS (scripts/bench_memory.py)
        self.layout = Layout.from_cfg(cfg, on_gpu)
        self.origin = "given model"
        if model is None:
            model, self.origin = meta_model(cfg.model)
        self.model = model
        self.method = str(cfg.method.name)
        exclude = list(cfg.method.get("exclude") or ["embed_tokens", "wte", "vision_tower", "visual",
                                                     "multi_modal_projector"])
        self.exclude = exclude
        self.counts: Counts = count(model, exclude)

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> float:
        L = self.layout
        weights = self.counts.total * L.dtype_bytes
        if L.engine == "deepspeed" and L.zero_stage == 3 and not self._optimizer_outside_zero():
            return weights / L.world  # whole only inside each layer's forward
        return weights

    def _optimizer_outside_zero(self) -> bool:
        return self.method in IMPORTANCE_METHODS

    def _trainable_names(self) -> set[str]:
        names = [n for n, _ in self.model.named_parameters()]
        embedding = self.model.get_input_embeddings().weight
        non_embedding = {n for n, p in self.model.named_parameters() if p is not embedding}
        if self.method == "layernorm":
            from piece_cl.methods.layernorm import is_norm

            return {n for n in names if is_norm(n)}
        if self.method in LORA_METHODS:
            targets = tuple(self.cfg.method.get("target_modules", ["q_proj", "v_proj"]))
            return {n for n in names if any(f".{t}." in n for t in targets) and "vision" not in n and "visual" not in n}
        if self.method in IMPORTANCE_METHODS:
            from piece_cl.importance import eligible_parameters

            return {n for n, _ in eligible_parameters(self.model, exclude=self.exclude)}
        return non_embedding

    def activations(self, rows: int, tokens: int, kind: str) -> dict[str, float]:
        key = (rows, tokens, kind, self.method)
        if key not in _SAVED.setdefault(id(self.model), {}):
            if kind == "importance":
                from piece_cl.importance import eligible_parameters

                ids = {id(p) for _, p in eligible_parameters(self.model, exclude=self.exclude)}
                hooked = [m for m in self.model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]
                _SAVED[id(self.model)][key] = saved_bytes(self.model, rows, tokens, None, hooked)
            else:
                _SAVED[id(self.model)][key] = saved_bytes(self.model, rows, tokens, self._trainable_names())
        counted = _SAVED[id(self.model)][key]
        return {k: v * calibration.activation_factor(kind, self.on_gpu) for k, v in counted.items()}

    # -- phases ---------------------------------------------------------------------------------
    def importance(self) -> Phase | None:
        """Before each task (PIECE) or after it (EWC's posterior Fisher)."""
        method, L = self.cfg.method, self.layout
        tokens, accumulate = L.tokens, "float32"
        if self.method in IMPORTANCE_METHODS:
            kind, imp = IMPORTANCE_METHODS[self.method], method.importance
            chunk = int(imp.chunk_size) if imp.granularity == "sample" else _largest(imp.batch_size)
            if str(imp.get("truncation", "training")) == "authors":
                tokens = int(imp.max_prompt_len) + int(imp.max_answer_len)
            host = str(imp.get("moments_device") or "") == "cpu"
            sharded = bool(imp.get("shard_moments", True))
            accumulate = str(imp.get("accumulate", "float32"))
        elif self.method == "ewc" and method.get("fisher_source", "posterior") == "posterior":
            kind, chunk, sharded = "fisher", L.micro_batch, True
            host = str(method.get("fisher_device") or "") == "cpu"
        else:
            return None
        phase = Phase("importance", note=f"chunk {chunk} x {tokens} tokens")
        phase.parts["weights"] = self.counts.total * L.dtype_bytes
        moments = moment_bytes(self.counts.eligible, L.world, kind, accumulate, sharded)
        (phase.host if host else phase.parts)["moments"] = moments
        if host or (sharded and L.world > 1):  # one layer's chunk sums wait in the compute dtype
            phase.parts["layer sums"] = moment_bytes(0, 1, kind, accumulate, largest=self.counts.largest_linear)
        if self.method == "ewc":
            self._add_ewc_state(phase)
        acts = self.activations(chunk, tokens, "importance")
        phase.parts["activations"] = acts["saved"]
        phase.parts["transient"] = acts["logits"] + per_sample_buffer(self.counts.largest_linear, chunk)
        phase.parts["runtime"] = calibration.runtime_bytes("importance", self.on_gpu)
        return phase

    def _add_ewc_state(self, phase: Phase) -> None:
        """F and θ*, on the host with `fisher_device: cpu` (methods/ewc.py keeps them there)."""
        method = self.cfg.method
        dtype_bytes = torch.finfo(_dtype(method.get("fisher_dtype", "float32"))).bits // 8
        on_host = str(method.get("fisher_device") or "") == "cpu"
        (phase.host if on_host else phase.parts)["fisher+anchor"] = 2 * self.counts.non_embedding * dtype_bytes

    def training(self) -> Phase:
        L, c = self.layout, self.counts
        phase = Phase("training step", note=f"micro batch {L.micro_batch} x {L.tokens} tokens")
        phase.parts["weights"] = self.weight_bytes
        trainable = sum(p.numel() for n, p in self.model.named_parameters() if n in self._trainable_names())
        if self.method in IMPORTANCE_METHODS:
            k = top_k(float(self.cfg.method.ratio), c.total)
            phase.parts["sparse adam (k entries)"] = sparse_adam_bytes(k, L.dtype_bytes == 4)
            phase.parts["dense grads (norms)"] = c.norms * L.dtype_bytes
        else:
            if self.method in LORA_METHODS:
                trainable = self._lora_entries()
            phase.parts.update(self._dense_optimizer(trainable, phase))
            if self.method == "ewc":
                self._add_ewc_state(phase)
            if self.method == "gem":
                grad_bytes = torch.finfo(_dtype(self.cfg.method.get("grad_dtype", "float32"))).bits // 8
                on_host = str(self.cfg.method.get("grad_device") or "") == "cpu"  # methods/gem.py
                (phase.host if on_host else phase.parts)["reference grads"] = (L.tasks - 1) * trainable * grad_bytes
            if self.method == "lwf":
                phase.parts["teacher"] = c.total * L.dtype_bytes
        acts = self.activations(L.micro_batch, L.tokens, "train")
        phase.parts["activations"] = acts["saved"]
        phase.parts["transient"] = acts["logits"]
        phase.parts["runtime"] = calibration.runtime_bytes("train", self.on_gpu)
        return phase

    def _lora_entries(self) -> int:
        r = int(self.cfg.method.get("r", 8))
        shapes = [p.shape for n, p in self.model.named_parameters() if n in self._trainable_names() and p.dim() == 2]
        adapters = self.layout.tasks if self.method == "olora" else 1
        return adapters * sum(r * (s[0] + s[1]) for s in shapes)

    def _dense_optimizer(self, trainable: int, phase: Phase) -> dict[str, float]:
        """Gradients and Adam state of `trainable` entries under the configured engine."""
        L = self.layout
        if L.engine != "deepspeed":  # torch AdamW: exp_avg, exp_avg_sq like the parameter
            return {"grads": trainable * L.dtype_bytes, "adam state": 2 * trainable * L.dtype_bytes}
        state = trainable * (12 if L.bf16_master else 8)  # fp32 master (bf16) + two fp32 moments
        grads = trainable * (L.dtype_bytes + (4 if L.bf16_master else 0))
        shard = L.world
        parts = {"grads": grads / shard if L.zero_stage >= 2 else grads}
        optimizer_state = state / shard if L.zero_stage >= 1 else state
        if L.offload_optimizer:
            phase.host["adam state (offloaded)"] = optimizer_state
        else:
            parts["adam state"] = optimizer_state
        return parts

    def evaluation(self) -> Phase:
        L, c = self.layout, self.counts
        phase = Phase("evaluation", note=f"batch {L.eval_batch} x ({L.eval_prompt} + {L.eval_new}) tokens")
        phase.parts["weights"] = c.total * L.dtype_bytes
        tokens = L.eval_prompt + L.eval_new
        phase.parts["kv cache"] = L.eval_batch * tokens * c.kv_bytes_per_token * L.dtype_bytes
        text = c.text_config
        phase.parts["prefill"] = (L.eval_batch * L.eval_prompt * 3 * text.intermediate_size * L.dtype_bytes
                                  * calibration.activation_factor("eval", self.on_gpu))
        if self.method == "ewc":
            self._add_ewc_state(phase)
        phase.parts["runtime"] = calibration.runtime_bytes("eval", self.on_gpu)
        return phase

    def phases(self) -> list[Phase]:
        return [p for p in (self.importance(), self.training(), self.evaluation()) if p is not None]
