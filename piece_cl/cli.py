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
import errno
import re
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from piece_cl.errors import PieceError
from piece_cl.io import disk_full_errno
from piece_cl.schema import flatten_config, validate_config

CONFIG_DIR = Path(str(importlib.resources.files("piece_cl.configs")))
GROUPS = ("model", "benchmark", "method", "optimizer", "trainer", "eval", "protocol", "paths", "experiment", "logger")
STARTED = time.time()  # before Hydra makes this attempt's run directory (rundir.created_by_this_attempt)
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
FAILED_JOBS: list[str] = []  # multirun: the refused jobs, summarised at the end
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
    """Refuse values that would waste a job or record a wrong number, each with the key to fix.

    Types and ranges come from the one table in schema.py; what only a method knows (its trainer
    needs) from the method.
    """

    validate_config(cfg)
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
            "trainer.rdzv_endpoint", "trainer.rdzv_id",
            "model.paper_name", "method.paper_name", "protocol.name")  # display names (protocol.name: older runs)


def config_difference(old: dict, new: dict) -> str | None:
    """The first setting that differs between two resolved configs, ignoring VOLATILE keys."""
    def kept(key: str) -> bool:
        return key.split(".")[0] not in VOLATILE and ".".join(key.split(".")[:2]) not in VOLATILE

    a = {k: v for k, v in flatten_config(old).items() if kept(k)}
    b = {k: v for k, v in flatten_config(new).items() if kept(k)}
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            return f"{key}: {a.get(key, '<unset>')} in the run, {b.get(key, '<unset>')} now"
    return None


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


def environment_message(err: BaseException) -> str | None:
    """One line for a file the operating system refused (permissions, read-only filesystem), naming it."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DENIED_ERRNOS:
            target = err.filename or "a file"
            return (f"cannot write or read {target} ({os.strerror(err.errno)}); make it writable, or point the key "
                    "that names it (paths.output_root, hydra.run.dir, paths.cache_dir, paths.*_root) elsewhere")
        err = err.__cause__ or err.__context__
    return None


def refusal(err: BaseException, run_dir: Path) -> str | None:
    """The one line for an error the user can fix, or None for a bug (shown with its traceback)."""
    if isinstance(err, PieceError):
        return str(err)
    code = disk_full_errno(err)
    if code is not None:
        return disk_full_message(err, code, run_dir)
    return environment_message(err)


def interrupted_message(run_dir: Path) -> str:
    from piece_cl.rundir import holds_committed_work

    if run_dir.is_dir() and holds_committed_work(run_dir):
        return f"interrupted; rerun the same command with hydra.run.dir={run_dir} to resume"
    return "interrupted before anything was committed; rerun the same command to start again"


def hydra_message(text: str) -> str:
    """Hydra's multi-line composition errors as one line (an unknown key gets its fix)."""
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown and ("not in struct" in text or "To append to your config" in text):
        key = unknown.group(1)
        return f"unknown config key '{key}'; check its spelling (a new key is added with +{key}=...)"
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith(("full_key:", "object_type", "reference_type", "Set the env"))]
    return " ".join(lines)


def fail(message: str, code: int = 2) -> None:
    print(f"piece-run: error: {message}", file=sys.stderr)
    sys.exit(code)


def report_refusal(message: str) -> None:
    """Exit with the line; in a multirun, print it, remember the job and let the sweep go on."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        fail(message)
    job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task) or 'defaults'})"
    print(f"piece-run: error: {job}: {message}", file=sys.stderr)
    FAILED_JOBS.append(job)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    from piece_cl.rundir import RunDirLock, created_by_this_attempt, remove_if_ours

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.trainer.engine == "deepspeed" and _joins_first_node(cfg):
        return
    ours = created_by_this_attempt(run_dir, STARTED)
    try:
        lock = RunDirLock(run_dir).__enter__()
    except PieceError as err:  # another attempt owns the directory: touch nothing in it
        report_refusal(str(err))
        return
    try:
        _attempt(cfg, run_dir)
    except KeyboardInterrupt:
        remove_if_ours(run_dir, ours)
        fail(interrupted_message(run_dir), code=130)
    except Exception as err:
        message = refusal(err, run_dir)
        if message is None:
            raise
        remove_if_ours(run_dir, ours)  # only an empty directory this attempt made; never a user's or a killed run's
        if cfg.verbose:
            raise
        report_refusal(message)
    finally:
        lock.__exit__()


def _attempt(cfg: DictConfig, run_dir: Path) -> None:
    """Validate everything, then (and only then) write config.yaml, then run or resume."""
    from piece_cl.rundir import check_run_dir

    validate(cfg)
    from piece_cl.progress import console
    from piece_cl.results import load_results
    from piece_cl.run import run

    if check_run_dir(cfg, run_dir, config_difference):
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
    global STARTED
    STARTED = time.time()
    FAILED_JOBS.clear()
    try:
        check_overrides(sys.argv[1:])
    except PieceError as err:
        fail(str(err))
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # composition errors reach us whole, to be said in one line
    try:
        _main()
    except KeyboardInterrupt:
        fail("interrupted before the run started; nothing was written", code=130)
    except (HydraException, OmegaConfBaseException) as err:
        fail(hydra_message(str(err)))
    except OSError as err:  # Hydra making a run directory under a read-only output root
        message = environment_message(err)
        if message is None:
            raise
        fail(message)
    if FAILED_JOBS:
        fail(f"{len(FAILED_JOBS)} job(s) of the multirun were refused: {'; '.join(FAILED_JOBS)}")


if __name__ == "__main__":
    main()
