"""`piece-plan`: the predicted peak memory per rank of each phase of a run, before queueing it.

    piece-plan method=piece_s model=llama3_8b benchmark=trace
    piece-plan method=piece_s model=qwen3_14b trainer=deepspeed trainer.nproc_per_node=4 plan.device_memory_gb=80

The config is composed exactly as `piece-run` composes it (same groups, same overrides); `plan.*`
arguments are the plan's own: `plan.device_memory_gb` (default: the visible GPU's, else 80).
Exit status 0 when every phase fits, 1 when one does not, 2 for bad input.
"""
from __future__ import annotations

import sys

from piece_cl.errors import PieceError
from piece_cl.plan.report import plan_text, visible_device_gb

DEFAULT_DEVICE_GB = 80.0  # the paper's A100-80GB when no GPU is visible and none is stated


def compose(argv: list[str]):
    """The piece-run config for `argv` (Hydra's compose API: no run directory, no logging setup)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from piece_cl.cli import CONFIG_DIR, check_overrides

    check_overrides(argv)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=argv)


def split_plan_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    plan, rest = {}, []
    for arg in argv:
        key = arg.lstrip("+")
        if key.startswith("plan."):
            name, _, value = key[len("plan."):].partition("=")
            if name != "device_memory_gb":
                raise PieceError(f"unknown plan setting 'plan.{name}'; known: plan.device_memory_gb")
            plan[name] = value
        else:
            rest.append(arg)
    return rest, plan


def device_gb(stated: str | None) -> tuple[float, str]:
    from piece_cl.plan.report import visible_device_gb

    if stated is not None:
        try:
            value = float(stated)
        except ValueError:
            raise PieceError(f"plan.device_memory_gb must be a number of GB, got {stated!r}") from None
        if value <= 0:
            raise PieceError(f"plan.device_memory_gb must be positive, got {stated}")
        return value, "plan.device_memory_gb"
    visible = visible_device_gb()
    if visible is not None:
        return visible, "visible GPU 0"
    return DEFAULT_DEVICE_GB, "no GPU visible; an 80 GB A100 assumed (set plan.device_memory_gb)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides, plan_args = split_plan_args(argv)
        capacity, where = device_gb(plan_args.get("device_memory_gb"))
        cfg = compose(overrides)
        text, fits = plan_text(cfg, capacity, where)
    except PieceError as err:
        print(f"piece-plan: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0 if fits else 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
