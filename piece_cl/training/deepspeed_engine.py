"""DeepSpeed backend of the engine interface: data parallel over the ranks torchrun started (launch.py).

Each global batch is cut into micro-batches exactly as the torch engine cuts it (same order, same
micro-batch size); micro-batch j goes to rank j mod world_size. Every rank runs the same number of
backward passes per step (a rank short of data repeats a micro-batch with weight 0, so the collectives
line up), and each micro loss is weighted by its share of the global batch. The reduced gradient is
therefore the torch engine's gradient: results match a single process at equal global batch.

DeepSpeed owns the model only inside `fit`: the module is wrapped per fit (the method builds a fresh
client optimiser per task) and is a plain, whole module between fits on every rank, so evaluation,
importance, stage checkpoints and resume work the same for any world size and ZeRO stage.

Optimisers that keep their own gradients (PIECE's `SparseMaskedAdam`, not a `torch.optim.Optimizer`)
cannot be wrapped by ZeRO, whose flat fp32 partitions would replace them. They run data-parallel
without ZeRO: their O(k) gradient buffer (and any dense gradients) is all-reduced before the step.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from piece_cl.errors import PieceError
from piece_cl.training.engine import TorchEngine, check_finite


def use_bf16(trainer_cfg) -> bool:
    """`trainer.bf16`: true, false, or auto (bf16 on GPUs, fp32 on CPU where bf16 is slow)."""
    value = trainer_cfg.get("bf16", "auto")
    return torch.cuda.is_available() if value == "auto" else bool(value)


def accumulation_steps(trainer_cfg, world_size: int) -> int:
    """Global batch = micro x accumulation x world size, exactly, or a one-line error naming the keys."""
    batch, micro = int(trainer_cfg.batch_size), int(trainer_cfg.micro_batch_size)
    if batch % (micro * world_size):
        raise PieceError(f"trainer.batch_size={batch} is not a multiple of trainer.micro_batch_size={micro} x "
                         f"{world_size} ranks; change one of them (the paper: 64 = 2 x 8 x 4 GPUs)")
    return batch // (micro * world_size)


def deepspeed_config(trainer_cfg, world_size: int) -> dict:
    stage = int(trainer_cfg.zero_stage)
    if stage not in (0, 1, 2, 3):
        raise PieceError(f"trainer.zero_stage must be 0, 1, 2 or 3, got {stage}")
    zero: dict = {"stage": stage}
    if trainer_cfg.offload_optimizer:
        if stage == 0:
            raise PieceError("trainer.offload_optimizer=true needs trainer.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if trainer_cfg.offload_param:
        if stage != 3:
            raise PieceError("trainer.offload_param=true needs trainer.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    micro = int(trainer_cfg.micro_batch_size)
    accumulation = accumulation_steps(trainer_cfg, world_size)
    return {
        "train_batch_size": micro * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(trainer_cfg.grad_clip or 0.0),
        "bf16": {"enabled": use_bf16(trainer_cfg)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the methods' client optimisers (AdamW, SGD, ...)
        # Offload keeps the client optimiser (torch AdamW stepping the CPU partitions): the same update as
        # without offload, proven equal in tests/test_deepspeed.py; DeepSpeedCPUAdam would be faster per step.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def init_distributed(trainer_cfg) -> None:
    """Join the process group torchrun describes (or a group of one when started without torchrun)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(minutes=int(trainer_cfg.get("dist_timeout_min", 120))))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def close_distributed() -> None:
    """Barrier, then destroy the group: without it gloo ranks abort at exit (docs/measured.md)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class DeepSpeedEngine(TorchEngine):
    """The torch engine's data handling with DeepSpeed ZeRO data parallelism for the optimiser step."""

    def __init__(self, trainer_cfg, model: nn.Module, tokenizer):
        init_distributed(trainer_cfg)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            trainer_cfg = _with_device(trainer_cfg, f"cuda:{os.environ['LOCAL_RANK']}")
        if use_bf16(trainer_cfg):
            model = model.to(torch.bfloat16)  # before any optimiser: master copies are taken from these weights
        super().__init__(trainer_cfg, model, tokenizer)
        self.micro_batch_size = int(trainer_cfg.micro_batch_size)
        self.accumulation = accumulation_steps(trainer_cfg, self.world_size)
        self.ds_config = deepspeed_config(trainer_cfg, self.world_size)
        self.zero_stage = int(trainer_cfg.zero_stage)
        self._wrapped = None  # the DeepSpeed engine of the current fit (None for self-managed optimisers)

    # -- gradients ------------------------------------------------------------------------------
    @property
    def _grad_scale(self) -> float:
        return float(self.world_size) if self._wrapped is not None else 1.0  # see `_step`'s rescale

    def average_across_ranks(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)
        tensor.div_(self.world_size)

    def barrier(self) -> None:
        dist.barrier()

    def get_grad(self, name: str, param: nn.Parameter) -> torch.Tensor | None:
        if self._wrapped is None:
            return param.grad
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param) if param.requires_grad else None

    def set_grad(self, name: str, param: nn.Parameter, value: torch.Tensor) -> None:
        if self._wrapped is None:
            return super().set_grad(name, param, value)
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        current = safe_get_full_grad(param)  # dtype and shape of the accumulation buffer
        safe_set_full_grad(param, value.to(current.dtype).reshape(current.shape))

    # -- training -------------------------------------------------------------------------------
    def fit(self, ctx, method, records, epochs, optimizer_factory, on_step=None, description="train",
            epoch_dir=None) -> dict:
        """The torch engine's fit; epoch states (`epoch_dir`) only for optimisers outside ZeRO, whose state
        every rank holds whole (Method.check_trainer refuses the others in the parent). A fit nested in an
        epoch event keeps the open fit's wrapper."""
        nested = self._open is not None
        try:
            return super().fit(ctx, method, records, epochs, optimizer_factory, on_step, description, epoch_dir)
        finally:
            if not nested:
                self._release()

    def prepare(self, optimizer) -> None:
        """Wrap the model for this fit's client optimiser (the torch engine's `fit` builds it)."""
        self._release()
        if isinstance(optimizer, torch.optim.Optimizer):
            import deepspeed

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a slow, abort-prone op build
            self._wrapped, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=self.ds_config)

    def _release(self) -> None:
        """Hand the module back whole: ZeRO-3 partitions are gathered, DeepSpeed's hooks removed."""
        if self._wrapped is not None:
            if self.zero_stage == 3:
                _unpartition(self._wrapped)  # destroys the wrapper once the full tensors are copied
            else:
                self._wrapped.destroy()
                for param in self.model.parameters():  # ZeRO-1/2 left them as views of one flat buffer
                    param.data = param.data.clone()
        self._wrapped = None

    def _step(self, ctx, method, optimizer, params, chunk: list[dict]) -> float:
        micros = [chunk[i : i + self.micro_batch_size] for i in range(0, len(chunk), self.micro_batch_size)]
        mine = micros[self.rank :: self.world_size]
        slots = math.ceil(len(micros) / self.world_size)
        # DeepSpeed averages over ranks; the loop below wants the sum of the share-weighted micro losses.
        rescale = self._grad_scale
        local = torch.zeros((), dtype=torch.float64)
        for slot in range(slots):
            micro, weight = (mine[slot], len(mine[slot]) / len(chunk)) if slot < len(mine) else (micros[0], 0.0)
            batch = self.batch(micro)
            if self._wrapped is not None:
                self._wrapped.set_gradient_accumulation_boundary(slot == slots - 1)
                loss = method.loss(ctx, batch, self._wrapped(**batch))
            else:
                loss = method.loss(ctx, batch, self.model(**batch))
            check_finite(loss, ctx, self.global_step)
            scaled = loss * (weight * rescale)
            if self._wrapped is not None:
                self._wrapped.backward(scaled, scale_wrt_gas=False)
            else:
                scaled.backward()
            local += float(loss.detach()) * weight
        dist.all_reduce(local)
        if self._wrapped is not None:
            method.after_backward(ctx)  # between the reduction and the step: full grads via safe accessors
            self._wrapped.step()  # clips to trainer.grad_clip, steps, zeroes
            self.grad_norm = self._wrapped.get_global_grad_norm()  # before clipping (tracking only)
        else:
            self._reduce_self_managed(optimizer, params)
            self._step_tail(ctx, method, optimizer, params)
        return float(local)

    def _reduce_self_managed(self, optimizer, params) -> None:
        """Sum the gradients a self-managed optimiser will read: its flat buffer (O(k)) and dense grads."""
        if self.world_size == 1:
            return
        buffers = [p.grad for _, p in params if p.grad is not None]
        own = getattr(optimizer, "grad", None)
        if isinstance(own, torch.Tensor):
            buffers.append(own)
        for tensor in buffers:
            dist.all_reduce(tensor)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, model: nn.Module, tokenizer, directory) -> None:
        """Consolidated Hugging Face checkpoint: the module is whole between fits, so rank 0 writes it."""
        if self.is_main:
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)


def _with_device(trainer_cfg, device: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(trainer_cfg, resolve=True))
    cfg.device = device
    return cfg


def _unpartition(wrapped) -> None:
    """ZeRO-3: gather every parameter (collectively, same order on all ranks) and keep the full tensors."""
    import deepspeed

    module = wrapped.module
    params = list(module.parameters())
    full = []
    for param in params:
        with deepspeed.zero.GatheredParameters([param]):
            full.append(param.data.detach().clone())
    wrapped.destroy()
    for param, data in zip(params, full):
        for attribute in [a for a in vars(param) if a.startswith("ds_") or a in _ZERO3_ATTRIBUTES]:
            delattr(param, attribute)
        param.data = data


_ZERO3_ATTRIBUTES = {"all_gather", "all_gather_coalesced", "partition", "partition_gradients", "reduce_gradients_at_owner",
                     "padding_size", "partition_numel", "convert_to_zero_parameters", "item_override",
                     "_z3_optimizer", "_hp_mapping", "_dp_group", "_zero_optimizer"}
