"""The one table of typed, ranged config keys, checked once when the config is composed.

Why a table: an override such as `trainer.epochs=1.5` or `benchmark.probe.timeout=-1` reaches the code
as a perfectly readable value and produces a wrong number with exit 0 (one epoch trained, 1.5 recorded;
every program timed out). Every numeric key (and every switch) that decides a result is listed here with
its type and range, and `validate_config` refuses the first violation in one line naming the key.
A key absent from the composed config (a method without `ratio`, the torch engine without
`zero_stage`) is skipped; a key listed as optional may be null.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from piece_cl.errors import PieceError


@dataclass(frozen=True)
class Rule:
    kind: str                  # "int" | "float" | "bool"
    low: float | None = None   # bound, inclusive unless low_open
    high: float | None = None  # bound, inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    optional: bool = False     # null allowed
    per_task: bool = False     # also a {task: value} mapping, each value checked

    def describe(self) -> str:
        noun = {"int": "an integer", "float": "a number", "bool": "true or false"}[self.kind]
        if self.low is not None and self.high is not None:
            noun += f" in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            noun += f" {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            noun += f" {'<' if self.high_open else '<='} {_num(self.high)}"
        noun += " (or null)" if self.optional else ""
        return noun + (", or a {task: value} mapping of such" if self.per_task else "")

    def accepts(self, value) -> bool:
        if self.per_task and isinstance(value, dict):
            return bool(value) and all(Rule(self.kind, self.low, self.high, self.low_open, self.high_open).accepts(v)
                                       for v in value.values())
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE_INT = Rule("int", low=1)
COUNT = Rule("int", low=0)                     # 0 allowed (0 = off)
SIZE = Rule("int", low=1, optional=True)       # null: everything
POSITIVE = Rule("float", low=0, low_open=True)
NON_NEGATIVE = Rule("float", low=0)
FRACTION = Rule("float", low=0, high=1, low_open=True)
BOOL = Rule("bool")
PER_TASK_INT = Rule("int", low=1, per_task=True)  # the authors' importance batch: one size or one per task

SCHEMA: dict[str, Rule] = {
    "seed": COUNT,
    "resume": BOOL, "verbose": BOOL, "save_checkpoints": BOOL,
    # model (trainer.* and eval.* interpolate these: the model key is named first)
    "model.lr": POSITIVE, "model.lora_lr": POSITIVE, "model.epochs": POSITIVE_INT, "model.batch_size": POSITIVE_INT,
    "model.max_prompt_len": POSITIVE_INT, "model.max_answer_len": POSITIVE_INT, "model.init_seed": COUNT,
    "model.download": BOOL, "model.multimodal": BOOL, "model.chat_template": BOOL,
    "model.tokenizer.vocab_size": POSITIVE_INT,
    "model.pretrain.problems": POSITIVE_INT, "model.pretrain.steps": POSITIVE_INT,
    "model.pretrain.batch_size": POSITIVE_INT, "model.pretrain.lr": POSITIVE, "model.pretrain.seed": COUNT,
    "model.arch.hidden_size": POSITIVE_INT, "model.arch.intermediate_size": POSITIVE_INT,
    "model.arch.num_hidden_layers": POSITIVE_INT, "model.arch.num_attention_heads": POSITIVE_INT,
    "model.arch.num_key_value_heads": POSITIVE_INT, "model.arch.max_position_embeddings": POSITIVE_INT,
    # benchmark
    "benchmark.train_size": SIZE, "benchmark.eval_size": Rule("int", low=0, optional=True), "benchmark.test_size": SIZE,
    "benchmark.seed": COUNT,
    "benchmark.probe.n_problems": SIZE, "benchmark.probe.max_new_tokens": POSITIVE_INT,
    "benchmark.probe.timeout": POSITIVE, "benchmark.importance.batch_size": PER_TASK_INT,
    "protocol.importance_batch_size": PER_TASK_INT,  # (before method.importance.*, which interpolates it)
    # optimiser
    "optimizer.lr": POSITIVE, "optimizer.eps": POSITIVE, "optimizer.weight_decay": NON_NEGATIVE,
    # trainer
    "trainer.epochs": POSITIVE_INT, "trainer.batch_size": POSITIVE_INT, "trainer.micro_batch_size": POSITIVE_INT,
    "trainer.grad_clip": Rule("float", low=0, optional=True), "trainer.max_prompt_len": POSITIVE_INT,
    "trainer.max_answer_len": POSITIVE_INT, "trainer.shuffle": BOOL, "trainer.loss_curve_every": COUNT,
    "trainer.loss_curve_samples": POSITIVE_INT, "trainer.epoch_checkpoints": BOOL,
    "trainer.nproc_per_node": POSITIVE_INT, "trainer.nnodes": POSITIVE_INT,
    "trainer.node_rank": Rule("int", low=0, optional=True),
    "trainer.master_port": Rule("int", low=1, high=65535, optional=True),
    "trainer.zero_stage": Rule("int", low=0, high=3), "trainer.offload_optimizer": BOOL, "trainer.offload_param": BOOL,
    "trainer.dist_timeout_min": POSITIVE,
    # evaluation
    "eval.batch_size": POSITIVE_INT, "eval.max_prompt_len": POSITIVE_INT, "eval.seed": COUNT,
    "eval.do_sample": BOOL, "eval.probe_before": BOOL,
    "eval.top_k": Rule("int", low=1, optional=True), "eval.top_p": Rule("float", low=0, high=1, low_open=True, optional=True),
    "eval.temperature": Rule("float", low=0, low_open=True, optional=True),
    # methods
    "method.lr": POSITIVE, "method.ratio": FRACTION, "method.freeze_embeddings": BOOL, "method.fast_linear": BOOL,
    "method.r": POSITIVE_INT, "method.alpha": POSITIVE, "method.dropout": Rule("float", low=0, high=1, high_open=True),
    "method.gamma": NON_NEGATIVE, "method.lam": NON_NEGATIVE, "method.fisher_ranks": POSITIVE_INT,
    "method.fisher_samples": SIZE, "method.samples": SIZE, "method.memory_per_task": POSITIVE_INT,
    "method.margin": NON_NEGATIVE, "method.temperature": POSITIVE, "method.ce_weight": NON_NEGATIVE,
    "method.answer_only": BOOL, "method.from_first_task": BOOL, "method.fraction": FRACTION,
    "method.every_epoch": BOOL, "method.min_per_task": COUNT,
    "method.importance.samples": SIZE, "method.importance.xi_on_sums": BOOL,
    "method.importance.xi": Rule("float", low=0, low_open=True, optional=True),
    "method.importance.batch_size": PER_TASK_INT, "method.importance.chunk_size": POSITIVE_INT,
    "method.importance.max_prompt_len": POSITIVE_INT, "method.importance.max_answer_len": POSITIVE_INT,
    "method.importance.shard_moments": BOOL, "method.train_vision": BOOL,
    # protocol
    "protocol.ewc_lambda": NON_NEGATIVE, "protocol.ewc_fisher_ranks": POSITIVE_INT, "protocol.lwf_ce_weight": NON_NEGATIVE,
    "protocol.lwf_answer_only": BOOL, "protocol.importance_xi_on_sums": BOOL, "protocol.replay_fraction": FRACTION,
    "protocol.replay_every_epoch": BOOL,
}

_MISSING = object()


def flatten_config(node, prefix: str = "") -> dict:
    """A resolved config as {"a.b.c": leaf}: how keys are named in the schema, in resume checks and as hparams."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten_config(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _lookup(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _resolved(cfg: DictConfig) -> dict:
    """The config as plain values; an interpolation that cannot resolve is refused naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # InterpolationResolutionError, MissingMandatoryValue, ...
        key = getattr(err, "full_key", None) or "?"
        raise PieceError(f"config key {key} cannot be resolved: {str(err).splitlines()[0]}") from None


def validate_config(cfg: DictConfig) -> None:
    """Refuse the first key whose value has the wrong type or range, and an empty task list."""
    tree = _resolved(cfg)
    for key, rule in SCHEMA.items():
        value = _lookup(tree, key)
        if value is not _MISSING and not rule.accepts(value):
            raise PieceError(f"{key} must be {rule.describe()}, got {value!r}")
    tasks = _lookup(tree, "benchmark.tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise PieceError(f"benchmark.tasks must be a non-empty list of task names, got {tasks!r}")
