"""`piece-run`: compose the config (Hydra, in this process only), write it into the run directory, run.

    piece-run                                   # the embedded miniature on CPU
    piece-run method=piece_s model=llama3_8b benchmark=trace paths.trace_root=/data/TRACE
    piece-run -m method=seqft,piece_s           # Hydra multirun
    piece-run --cfg job method=piece_s model=llama3_8b benchmark=trace   # show the composed config
"""
from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import platform
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from piece_cl.errors import PieceError
from piece_cl.io import disk_full_errno

CONFIG_DIR = Path(str(importlib.resources.files("piece_cl.configs")))
GROUPS = ("model", "benchmark", "method", "optimizer", "trainer", "eval", "protocol", "paths", "experiment", "logger")
VERSIONED = ("piece-cl", "torch", "transformers", "deepspeed", "peft", "hydra-core", "tokenizers")


def config_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_overrides(argv: list[str]) -> None:
    """Unknown config-group choices fail here with one line, before Hydra prints a page."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        if key not in GROUPS or value in ("", "null"):
            continue
        known = config_options(key)
        for choice in value.strip("[]").split(","):  # logger=[tensorboard,wandb] selects several
            if not choice or choice.startswith(("range(", "choice(", "glob(")):
                continue
            if choice not in known:
                raise PieceError(f"unknown {key} '{choice}'; known: {', '.join(known)}")


def validate(cfg: DictConfig) -> None:
    """Refuse values that would waste a job, each with the key to fix."""
    checks = [
        (float(cfg.optimizer.lr) > 0, f"optimizer.lr must be positive, got {cfg.optimizer.lr}"),
        (int(cfg.trainer.epochs) > 0, f"trainer.epochs must be positive, got {cfg.trainer.epochs}"),
        (int(cfg.trainer.batch_size) > 0, f"trainer.batch_size must be positive, got {cfg.trainer.batch_size}"),
        (int(cfg.trainer.micro_batch_size) > 0, f"trainer.micro_batch_size must be positive, got {cfg.trainer.micro_batch_size}"),
    ]
    if "ratio" in cfg.method:
        checks.append((0 < float(cfg.method.ratio) <= 1, f"method.ratio must be in (0, 1], got {cfg.method.ratio}"))
    for ok, message in checks:
        if not ok:
            raise PieceError(message)
    from piece_cl.methods.base import build_method

    build_method(cfg.method).check_trainer(cfg.trainer)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# Keys that may change between a run and its resumption.
VOLATILE = ("resume", "verbose", "logger", "run_dir", "world_size", "distributed", "versions", "overrides",
            "trainer.nproc_per_node", "trainer.master_port", "trainer.nnodes", "trainer.node_rank",
            "trainer.rdzv_endpoint", "trainer.rdzv_id")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def config_difference(old: dict, new: dict) -> str | None:
    """The first setting that differs between two resolved configs, ignoring VOLATILE keys."""
    def kept(key: str) -> bool:
        return key.split(".")[0] not in VOLATILE and ".".join(key.split(".")[:2]) not in VOLATILE

    a = {k: v for k, v in _flatten(old).items() if kept(k)}
    b = {k: v for k, v in _flatten(new).items() if kept(k)}
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            return f"{key}: {a.get(key, '<unset>')} in the run, {b.get(key, '<unset>')} now"
    return None


def check_run_dir(cfg: DictConfig, run_dir: Path) -> bool:
    """True when the run directory already holds a finished run that resume=true asked to show.

    A directory holding an unfinished run with the same config is continued (resume); a finished run is
    never overwritten; a different config is refused.
    """
    config_file, results_file = run_dir / "config.yaml", run_dir / "results.json"
    if not results_file.exists():
        if config_file.exists():
            _check_same_config(cfg, run_dir)
        return False
    import json

    finished = json.loads(results_file.read_text() or "{}")
    if finished.get("stages_done") is not None and finished["stages_done"] == len(finished.get("tasks", [None])):
        if cfg.resume:
            return True
        raise PieceError(f"{run_dir} already holds a finished run; choose another hydra.run.dir")
    if not config_file.exists():
        raise PieceError(f"{run_dir} holds results.json but no config.yaml; refusing to guess what it was")
    _check_same_config(cfg, run_dir)
    return False


def _check_same_config(cfg: DictConfig, run_dir: Path) -> None:
    stored = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    difference = config_difference(stored, OmegaConf.to_container(cfg, resolve=True))
    if difference:
        raise PieceError(f"{run_dir} holds a run with a different config ({difference}); choose another hydra.run.dir")


def write_config(cfg: DictConfig, run_dir: Path) -> None:
    from piece_cl.io import atomic_write_text

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["run_dir"] = str(run_dir)
    resolved["world_size"] = 1
    resolved["versions"] = library_versions()
    resolved["overrides"] = list(HydraConfig.get().overrides.task)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))


def disk_full_message(err: BaseException, code: int, run_dir: Path) -> str:
    """One line for a write that ran out of space: what was being written, and how to go on."""
    from piece_cl.results import load_results

    target = getattr(err, "filename", None) or f"into {run_dir}"
    committed = load_results(run_dir)
    if committed is not None and committed.stages_done:
        advice = (f"free space and rerun the same command with hydra.run.dir={run_dir} to resume from the last "
                  f"committed stage ({committed.stages_done}/{len(committed.tasks)})")
    else:
        advice = "free space and rerun the same command (no stage was committed yet, so it starts over)"
    return f"no space left on device while writing {target} ({os.strerror(code)}); {advice}"


def fail(message: str) -> None:
    print(f"piece-run: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.trainer.engine == "deepspeed" and _joins_first_node(cfg):
        return
    existed = (run_dir / "results.json").exists()
    try:
        validate(cfg)
        from piece_cl.progress import console
        from piece_cl.results import load_results
        from piece_cl.run import run

        if check_run_dir(cfg, run_dir):
            console.print(f"{run_dir} is already finished; nothing to resume")
            console.print(load_results(run_dir).matrix_text())
            return
        write_config(cfg, run_dir)

        console.print(f"[bold]piece-run[/] {cfg.run_name} -> {run_dir}")
        if cfg.trainer.engine == "deepspeed":  # ranks read config.yaml; none of them runs Hydra
            from piece_cl.launch import launch

            results = launch(cfg, run_dir)
        else:
            results = run(cfg, run_dir)
        console.print(results.matrix_text())
        print(f"results: {run_dir / 'results.json'}")
    except Exception as err:
        disk_full = None if isinstance(err, PieceError) else disk_full_errno(err)
        if not isinstance(err, PieceError) and disk_full is None:
            raise
        if not existed and not (run_dir / "results.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing finished: leave nothing that looks like a run
        if cfg.verbose:
            raise
        fail(str(err) if disk_full is None else disk_full_message(err, disk_full, run_dir))


def _joins_first_node(cfg: DictConfig) -> bool:
    """On a node after the first, run this node's ranks in the first node's run directory (launch.join)."""
    from piece_cl.launch import join, node_rank

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if node_rank(cfg.trainer) == 0:
            return False
        join(cfg, run_dir)
    except PieceError as err:
        fail(str(err))  # never removes the directory: it is the first node's
    print(f"results: {run_dir / 'results.json'}")
    return True


def main() -> None:
    try:
        check_overrides(sys.argv[1:])
    except PieceError as err:
        fail(str(err))
    _main()


if __name__ == "__main__":
    main()
