"""Every leaf key of every config is read somewhere: a dead key is a setting a user changes for nothing.

The configs composed: the defaults, then each option of each group (`GROUPS` of piece_cl/cli.py) on top of
them, with Hydra's own node (`return_hydra_config`). A key path `a.b.c` is *live* when any of these holds:

1. *Read by code*: its parent is live (top-level keys: always) and its own name is accessed somewhere in
   piece_cl/ (a static AST scan): `x.c`, `x["c"]`, `x.get("c")` (or `.select`, `.pop`, `.setdefault`),
   a function given a node and the key, `f(node, "c")` (getattr, OmegaConf.select, data's cfg_get and
   resolve_root; a dotted string counts for each part), or a comparison with the string "c" (dispatch
   on the keys of a node, as the logger group is read).
2. *Interpolated*: a live value refers to it (`${a.b.c}`, `${.c}`, `oc.select:a.b.c`).
3. *Passed whole to a callable*: a `_target_` node that code instantiates passes its keys to the target,
   so each key must be a parameter of the target's signature (`_target_`, `_partial_`, `_convert_` are
   instantiate's own); `model.arch` is splatted into the model config (SPLATS: each key must be a
   parameter the receiving class or defaults table declares).
4. *A table*: TABLES are mappings looked up by a data value (a task name), so their keys are data.
5. `hydra.*`: read by Hydra itself (its records of the command line, RECORDS, interpolate nothing) (the launcher group is a structured config: Hydra rejects unknown keys
   when it composes, which tests/test_configs.py does).

Rule 1 matches by name, so it proves a key *may* be read, not that its path is: it catches a key nothing
reads under any name (a renamed or forgotten setting), which is the fault this guards against. ALLOWED
lists exceptions, each with its reason.
"""
from __future__ import annotations

import ast
import inspect
import re
from functools import lru_cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import piece_cl
from piece_cl.cli import CONFIG_DIR, GROUPS, config_options

SOURCE = Path(piece_cl.__file__).parent
GETTERS = {"get", "select", "pop", "setdefault"}
INSTANTIATE_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
TABLES = {"benchmark.importance.batch_size": "{task: mini-batch} table, looked up by task name (data/)"}
ALLOWED: dict[str, str] = {}
# Hydra's records of the command line and the job (they quote overrides; Hydra reads no key through them)
RECORDS = {("hydra", "overrides"), ("hydra", "job"), ("hydra", "runtime")}


def _splat_targets(cfg: DictConfig) -> set[str]:
    """Keys the receiver of `model.arch` accepts: LlamaConfig for the embedded miniature
    (models/tiny.py), families.DEFAULT_ARCH for the tiny real-family configs (models/families.py)."""
    if cfg.model.get("source") == "embedded":
        from transformers import LlamaConfig

        return set(inspect.signature(LlamaConfig.__init__).parameters)
    from piece_cl.models.families import DEFAULT_ARCH

    return set(DEFAULT_ARCH)


SPLATS = {"model.arch": _splat_targets}


@lru_cache(maxsize=1)
def accessed_names() -> frozenset[str]:
    """Every name piece_cl/ accesses as an attribute, a subscript, a getter's string or a compared string."""
    names: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                names.add(str(node.slice.value))
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                args = node.args if called in GETTERS and isinstance(func, ast.Attribute) else node.args[1:2]
                names.update(part for arg in args if isinstance(arg, ast.Constant)
                             and isinstance(arg.value, str) for part in arg.value.split("."))
            elif isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    strings = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    names.update(s.value for s in strings if isinstance(s, ast.Constant) and isinstance(s.value, str))
    return frozenset(names)


def instantiated() -> bool:
    return any("instantiate(" in p.read_text(encoding="utf-8") for p in SOURCE.rglob("*.py"))


def _nodes(node: DictConfig, prefix: tuple[str, ...] = ()):
    """(path, raw value or None for a node) for every key, parents before children."""
    for key in node.keys():
        child = node._get_node(key)
        path = prefix + (str(key),)
        if isinstance(child, DictConfig) and not OmegaConf.is_interpolation(node, key):
            yield path, None
            yield from _nodes(child, path)
        else:
            yield path, child._value()


REFERENCE = re.compile(r"\$\{(\.*[A-Za-z_][\w.-]*)\}|oc\.select:(\.*[A-Za-z_][\w.-]*)")


def _references(value: object, path: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Key paths an interpolation string refers to (absolute, or relative to the key's parent)."""
    refs = set()
    for match in REFERENCE.finditer(value if isinstance(value, str) else ""):
        target = match.group(1) or match.group(2)
        dots = len(target) - len(target.lstrip("."))
        parts = tuple(target.lstrip(".").split("."))
        refs.add(path[:len(path) - dots] + parts if dots else parts)
    return refs


def live_keys(cfg: DictConfig) -> tuple[set[str], set[str]]:
    """(leaf key paths of `cfg`, those live by the rules of this module's docstring)."""
    names, entries = accessed_names(), dict(_nodes(cfg))
    targets = {p[:-1]: v for p, v in entries.items() if p[-1] == "_target_" and isinstance(v, str)}
    live: set[tuple[str, ...]] = set()
    spread: set[tuple[str, ...]] = set()  # live keys whose interpolations were followed
    while True:
        for path, value in entries.items():
            if path in live:
                continue
            parent, key, dotted = path[:-1], path[-1], ".".join(path[:-1])
            parent_live = not parent or parent in live
            if path[0] == "hydra" or ".".join(path) in ALLOWED:
                ok = True
            elif dotted in TABLES or any(dotted.startswith(t + ".") for t in TABLES):
                ok = parent_live
            elif dotted in SPLATS:
                ok = parent_live and key in SPLATS[dotted](cfg)
            elif parent in targets:
                accepted = set(inspect.signature(_import(targets[parent])).parameters)
                ok = parent_live and instantiated() and (key in INSTANTIATE_KEYS or key in accepted)
            else:
                ok = parent_live and key in names
            if ok:
                live.add(path)
        fresh = live - spread
        for path in fresh:  # `${a.b}` reads a.b and everything under it
            if path[:2] in RECORDS:
                continue
            for ref in _references(entries[path], path):
                live.update(p for p in entries if p[:len(ref)] == ref)
        spread |= fresh
        if not fresh:
            break
    leaves = {p for p, v in entries.items() if v is not None}
    return {".".join(p) for p in leaves}, {".".join(p) for p in leaves & live}


def dead_keys(cfg: DictConfig) -> set[str]:
    leaves, live = live_keys(cfg)
    return leaves - live


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


CHOICES = [("defaults", None)] + [(group, name) for group in GROUPS for name in config_options(group)]


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_every_config_key_is_read():
    """A key is dead when no composition reads it (`model.lora_lr` is read only under the LoRA methods)."""
    seen: dict[str, str] = {}
    read: set[str] = set()
    for group, name in CHOICES:
        leaves, live = live_keys(_compose([] if name is None else [f"{group}={name}"]))
        read |= live
        for key in leaves:
            seen.setdefault(key, group if name is None else f"{group}={name}")
    dead = {key: where for key, where in sorted(seen.items()) if key not in read}
    assert not dead, ("keys no code reads (remove them, wire them up, or allow-list them with a reason in "
                      f"tests/test_config_keys.py), with a config that has them: {dead}")


def test_a_key_nothing_reads_is_caught():
    cfg = _compose(["+method.learning_rate_typo=0.1", "+benchmark.probe.nme=x", "+protocol.orphan=1"])
    assert {"method.learning_rate_typo", "benchmark.probe.nme", "protocol.orphan"} <= set(dead_keys(cfg))


def test_interpolation_reads_only_from_a_live_key():
    cfg = _compose(["+protocol.orphan=1", "+method.unread_alias=${protocol.orphan}"])
    dead = set(dead_keys(cfg))
    assert {"protocol.orphan", "method.unread_alias"} <= dead


def test_optimizer_keys_must_be_parameters_of_its_target():
    cfg = _compose(["+optimizer.momentum_typo=0.9"])
    assert "optimizer.momentum_typo" in dead_keys(cfg)
