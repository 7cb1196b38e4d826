"""Probe construction shared by the benchmarks: one reading of `benchmark.probe.*` for every code probe."""
from __future__ import annotations

from typing import Any

from piece_cl.benchmarks.registry import cfg_get
from piece_cl.evaluation.code_probe import CodeProbe


def code_probe(problems: list[dict], probe_cfg: Any, default_name: str) -> CodeProbe:
    """A Pass@1 probe named `<benchmark.probe.name>_pass@1`, with the configured budget and cut style."""
    return CodeProbe(
        name=f"{cfg_get(probe_cfg, 'name', default_name)}_pass@1",
        problems=problems,
        max_new_tokens=int(cfg_get(probe_cfg, "max_new_tokens", 128)),
        timeout=float(cfg_get(probe_cfg, "timeout", 5.0)),
        style=str(cfg_get(probe_cfg, "style", "authors")),
        allow_weaker_sandbox=bool(cfg_get(probe_cfg, "allow_weaker_sandbox", False)),
    )
