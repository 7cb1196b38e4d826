"""The plan as text (piece-plan), and the one-line warning a run prints before its weights load."""
from __future__ import annotations

from piece_cl.plan.memory import GB, Phase, Planner

HEADROOM = 0.10  # a phase "fits" when its peak leaves 10% of the device free (allocator fragmentation)


def fits(phase: Phase, capacity_gb: float) -> bool:
    return phase.peak <= (1 - HEADROOM) * capacity_gb * GB


def dominant(phases: list[Phase]) -> Phase:
    return max(phases, key=lambda p: p.peak)


def _with(cfg, **updates):
    from omegaconf import OmegaConf

    changed = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in updates.items():
        OmegaConf.update(changed, key, value, force_add=True)
    return changed


def remedies(cfg, phase: Phase, capacity_gb: float, planner: Planner) -> list[str]:
    """Settings that would make `phase` fit, each checked by re-planning with it."""
    tries: list[tuple[str, dict]] = []
    if phase.name == "importance" and "importance" in cfg.method:
        chunk = int(cfg.method.importance.chunk_size)
        tries += [(f"method.importance.chunk_size={c}", {"method.importance.chunk_size": c})
                  for c in (4, 2, 1) if c < chunk]
        tries.append(("method.importance.moments_device=cpu", {"method.importance.moments_device": "cpu",
                                                              "method.importance.chunk_size": 1}))
    if phase.name == "training step":
        micro = int(cfg.trainer.micro_batch_size)
        tries += [(f"trainer.micro_batch_size={m}", {"trainer.micro_batch_size": m}) for m in (2, 1) if m < micro]
        for n in (4, 8):
            tries.append((f"trainer=deepspeed trainer.nproc_per_node={n} trainer.zero_stage=2 trainer.micro_batch_size=1",
                          {"trainer.engine": "deepspeed", "trainer.nproc_per_node": n, "trainer.zero_stage": 2,
                           "trainer.micro_batch_size": 1}))
    if phase.name == "evaluation":
        batch = int(cfg.eval.batch_size)
        tries += [(f"eval.batch_size={b}", {"eval.batch_size": b}) for b in (8, 4, 1) if b < batch]
    found = []
    for label, updates in tries:
        trial = Planner(_with(cfg, **updates), model=planner.model)
        again = {p.name: p for p in trial.phases()}.get(phase.name)
        if again is not None and fits(again, capacity_gb):
            found.append(f"{label} ({again.peak / GB:.1f} GB)")
            if len(found) == 2:
                break
    return found


def plan_text(cfg, capacity_gb: float, where: str) -> tuple[str, bool]:
    planner = Planner(cfg)
    phases = planner.phases()
    c, L = planner.counts, planner.layout
    lines = [f"piece-plan: {cfg.method.name} on {cfg.model.name} ({c.total / 1e9:.3f} B parameters, "
             f"{c.eligible / 1e9:.3f} B eligible; shapes from {planner.origin})",
             f"layout: engine {L.engine}, {L.world} rank(s), {L.dtype_bytes * 8}-bit weights"
             + (f", ZeRO-{L.zero_stage}" if L.engine == "deepspeed" else "")
             + f"; device memory {capacity_gb:.0f} GB ({where}); a phase fits with {HEADROOM:.0%} headroom",
             "", f"{'phase':<15} {'peak/rank GB':>12} {'host GB':>8} {'fits':>5}  parts (GB)"]
    all_fit = True
    for phase in phases:
        ok = fits(phase, capacity_gb)
        all_fit &= ok
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in phase.parts.items() if v)
        host = sum(phase.host.values()) / GB
        lines.append(f"{phase.name:<15} {phase.peak / GB:>12.1f} {host:>8.1f} {'yes' if ok else 'NO':>5}  {parts}"
                     f"  [{phase.note}]")
    top = dominant(phases)
    lines.append(f"dominant phase: {top.name} ({top.peak / GB:.1f} GB per rank)")
    for phase in phases:
        if not fits(phase, capacity_gb):
            fixes = remedies(cfg, phase, capacity_gb, planner)
            lines.append(f"{phase.name} does not fit: " + ("; ".join(fixes) if fixes else "no single setting tried fits"))
    return "\n".join(lines), all_fit


def fit_warning(cfg, capacity_gb: float) -> str | None:
    """One line naming the phase that would not fit, its figures and settings that would, or None."""
    planner = Planner(cfg)
    for phase in planner.phases():
        if not fits(phase, capacity_gb):
            fixes = remedies(cfg, phase, capacity_gb, planner)
            return (f"WARNING memory plan: {phase.name} needs {phase.peak / GB:.1f} GB per rank of the device's "
                    f"{capacity_gb:.0f} GB (with {HEADROOM:.0%} headroom); would fit: "
                    + ("; ".join(fixes) if fixes else "none of the settings tried (piece-plan shows the parts)"))
    return None


def visible_device_gb() -> float | None:
    """The first visible GPU's memory in GB, None without one (here, not in plan/cli.py: run.py imports
    this module, and the CLI imports piece_cl.cli, which imports run.py)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1e9
    return None


def warn_if_unfit(cfg, log) -> None:
    """Before a run loads its weights: warn (never stop) when the plan says a phase will not fit its GPU.

    Checked when the run will use a GPU (the visible one's memory) or `+plan.device_memory_gb` is given;
    a CPU run without it is not planned (host memory is not what the plan predicts).
    """
    import logging

    stated = (cfg.get("plan") or {}).get("device_memory_gb")
    on_gpu = str(cfg.trainer.get("device", "auto")) in ("auto", "cuda")
    capacity = float(stated) if stated is not None else (visible_device_gb() if on_gpu else None)
    if capacity is None:
        return
    try:
        warning = fit_warning(cfg, capacity)
    except Exception as err:  # the plan must never stop a run it cannot model
        warning = f"memory plan unavailable ({type(err).__name__}: {err}); run piece-plan to see why"
    if warning:
        log(warning)
        logging.getLogger(__name__).warning(warning)
