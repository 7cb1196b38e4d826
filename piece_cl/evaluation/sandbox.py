"""Run model-written Python (HumanEval checks) confined by the kernel, with verdicts the code cannot forge.

`check_candidates` scores a problem with two processes: the sandboxed candidate (`_sandbox_child.py serve`:
the model's code, confined by namespaces, Landlock, seccomp and resource limits) and the test harness
(`_sandbox_harness.py`: the problem's trusted test), which calls the candidate over a pipe with plain
built-in values and alone writes the verdict. `check_programs` runs whole programs (code plus its own
tests) under the same confinement; such a program vouches for itself. At start-up `kernel_support()`
probes what the kernel offers; missing protection is refused unless the caller opts in
(`benchmark.probe.allow_weaker_sandbox`), never silently weaker. Details: docs/sandbox.md.
"""

import functools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from piece_cl.errors import PieceError
from piece_cl.evaluation import _sandbox_kernel

CHILD_SCRIPT = Path(__file__).with_name("_sandbox_child.py")
HARNESS_SCRIPT = Path(__file__).with_name("_sandbox_harness.py")
ALLOW_WEAKER_KEY = "benchmark.probe.allow_weaker_sandbox"
STARTUP_GRACE_S = 1.0  # interpreter start and confinement, on top of the program's own timeout
OUTPUT_LIMIT_MB = 8  # captured output, and the size of the work directory (tmpfs) / of any file written
DETAIL_CHARS = 2000
COMPILE_ERROR = b"compile-error"
PYTHON_GUARD = True  # the interpreter-level layer; tests switch it off to show the kernel alone holds
CPU_KILLS = {128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGXCPU, -signal.SIGKILL}
# What each kernel feature protects, named in the refusal when it is missing.
FEATURES = {
    "namespaces": "user/mount/network/PID namespaces (no network cut-off, other processes and /proc visible, "
                  "work directory on the host's disk)",
    "landlock": "Landlock (file reads and writes confined only by the in-interpreter guard, which the program "
                "can tamper with)",
    "seccomp": "the seccomp filter (fork, signals, sockets, device nodes, scheduling calls left to the "
               "in-interpreter guard)",
}


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program; `detail` is the tail of its output (why it failed)."""

    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (does not compile, or the sandbox failed)
    detail: str = ""


@dataclass(frozen=True)
class Candidate:
    """One problem to score: `program` is the model's code (prompt + completion, run in the sandbox);
    `prompt` and `test` are the problem's trusted text, run by the harness with `entry_point` bound to
    a proxy of the candidate's function."""

    program: str
    prompt: str
    test: str
    entry_point: str


@functools.lru_cache(maxsize=1)
def kernel_support() -> dict:
    """What the kernel confines here, tried for real in a child: {"namespaces", "landlock", "seccomp": True or
    the error; "landlock_abi"; "landlock_write_outside", "network": whether the probe could still do them}."""
    abi = _sandbox_kernel.landlock_abi()
    outside = tempfile.mkdtemp(prefix="piece_sandbox_probe_")
    try:
        settings = {"features": ["pdeathsig"], "parent_pid": os.getpid(), "cpu_seconds": 10, "memory_mb": 1024,
                    "file_mb": OUTPUT_LIMIT_MB, "landlock_abi": abi, "probe_outside": outside}
        done = subprocess.run([sys.executable, "-I", "-S", str(CHILD_SCRIPT), "probe", json.dumps(settings)],
                              env={}, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        lines = done.stdout.decode(errors="replace").strip().splitlines()
        report = json.loads(lines[-1]) if lines else {
            "probe": f"the probe exited {done.returncode}: "
                     f"{(done.stderr.decode(errors='replace').strip().splitlines() or ['no output'])[-1][:200]}"}
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        report = {"probe": f"{type(error).__name__}: {error}"}
    finally:
        shutil.rmtree(outside, ignore_errors=True)
    if abi < 1:
        report["landlock"] = "Landlock is not enabled in this kernel"
    if report.get("landlock") is True and report.get("landlock_write_outside", True):
        report["landlock"] = "Landlock did not stop a write outside the work directory"
    report["landlock_abi"] = abi
    return report


def sandbox_features(allow_weaker: bool = False) -> tuple[str, ...]:
    """The confinement to apply; PieceError naming what is lost when the kernel lacks some of it and the
    user did not opt in. Called when a probe is built, so the refusal comes before any training."""
    support = kernel_support()
    missing = [name for name in FEATURES if support.get(name) is not True]
    if missing and not allow_weaker:
        unprobed = f"not probed ({support['probe']})" if "probe" in support else "not probed"
        lost = "; ".join(f"{FEATURES[name]}: {support.get(name, unprobed)}" for name in missing)
        raise PieceError(f"refusing to execute model-written code: this kernel's sandbox lacks {lost}. "
                         f"Run on a kernel with these features, or set {ALLOW_WEAKER_KEY}=true to accept "
                         f"the weaker sandbox (docs/sandbox.md)")
    return ("pdeathsig", *(name for name in FEATURES if name not in missing))


def check_candidates(candidates: list[Candidate], timeout: float = 5.0, memory_mb: int = 1024,
                     workers: int | None = None, allow_weaker: bool = False) -> list[ExecResult]:
    """Score candidates in parallel, results in input order; passed = the harness's test passed."""
    features = sandbox_features(allow_weaker)
    return _parallel(lambda c: _check_one("serve", c, timeout, memory_mb, features), candidates, workers)


def check_programs(programs: list[str], timeout: float = 5.0, memory_mb: int = 1024,
                   workers: int | None = None, allow_weaker: bool = False) -> list[ExecResult]:
    """Run whole programs in parallel, results in input order; passed = ran to its end, exit 0."""
    features = sandbox_features(allow_weaker)
    return _parallel(lambda p: _check_one("run", p, timeout, memory_mb, features), programs, workers)


def check_program(program: str, timeout: float = 5.0, memory_mb: int = 1024,
                  allow_weaker: bool = False) -> ExecResult:
    return _check_one("run", program, timeout, memory_mb, sandbox_features(allow_weaker))


def check_candidate(candidate: Candidate, timeout: float = 5.0, memory_mb: int = 1024,
                    allow_weaker: bool = False) -> ExecResult:
    return _check_one("serve", candidate, timeout, memory_mb, sandbox_features(allow_weaker))


def _parallel(check, items: list, workers: int | None) -> list[ExecResult]:
    """One waiting thread per running check (each child dies with its thread: PR_SET_PDEATHSIG)."""
    if not items:
        return []
    workers = min(workers or _usable_cpus(), len(items))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(check, items))


def _usable_cpus() -> int:
    """CPUs this process may run on (a cluster job's allocation), not all of the node's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_one(mode: str, item, timeout: float, memory_mb: int, features: tuple[str, ...]) -> ExecResult:
    """Never raises: a sandbox failure scores `error` for this item only."""
    work_dir = None
    try:
        if "namespaces" not in features:  # weaker sandbox: the work directory lives on the host
            work_dir = tempfile.mkdtemp(prefix="piece_sandbox_")
        return _Run(mode, item, timeout, memory_mb, features, work_dir).result()
    except Exception as error:  # noqa: BLE001 - a sandbox failure must score, not stop the run
        return ExecResult(False, "error", f"sandbox: {type(error).__name__}: {error}")
    finally:
        if work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)  # does not follow symlinks out of the directory


class _Run:
    """The processes of one check, their pipes, the wall-clock limit and the final kill."""

    def __init__(self, mode, item, timeout, memory_mb, features, work_dir):
        self.mode, self.timeout, self.processes, self.fds = mode, timeout, [], []
        self.settings = {"features": list(features), "parent_pid": os.getpid(),
                         "cpu_seconds": math.ceil(timeout) + 1, "memory_mb": memory_mb,
                         "file_mb": OUTPUT_LIMIT_MB, "landlock_abi": _sandbox_kernel.landlock_abi(),
                         "work_dir": work_dir, "python_guard": PYTHON_GUARD}
        self.item = item

    def _pipe(self) -> tuple[int, int]:
        read, write = os.pipe()
        self.fds += [read, write]
        return read, write

    def _close(self, fd: int) -> None:
        if fd in self.fds:
            self.fds.remove(fd)
            os.close(fd)

    def _spawn(self, script: Path, args: list[str], settings: dict, stdin: bytes, output: int,
               pass_fds: tuple[int, ...]) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-I", "-S", str(script), *args, json.dumps(settings)],
                                   env={}, cwd="/", stdin=subprocess.PIPE, stdout=output, stderr=output,
                                   pass_fds=pass_fds, start_new_session=True)
        self.processes.append(process)
        try:
            process.stdin.write(stdin)
            process.stdin.close()
        except OSError:
            pass  # it already died; its exit status tells why
        return process

    def result(self) -> ExecResult:
        try:
            return self._execute()
        finally:
            self._kill_all()
            for fd in list(self.fds):
                self._close(fd)

    def _execute(self) -> ExecResult:
        out_read, out_write = self._pipe()
        verdict_read, verdict_write = self._pipe()
        started = time.monotonic()
        if self.mode == "run":
            token = secrets.token_hex(16)
            settings = {**self.settings, "result_fd": verdict_write}
            source = f"{token}\n{self.item}".encode("utf-8", errors="surrogatepass")
            judge = self._spawn(CHILD_SCRIPT, ["run"], settings, source, out_write, (verdict_write,))
            candidate = judge
        else:
            call_read, call_write = self._pipe()
            reply_read, reply_write = self._pipe()
            candidate_settings = {**self.settings, "call_fd": call_read, "reply_fd": reply_write,
                                  "entry_point": self.item.entry_point}
            candidate = self._spawn(CHILD_SCRIPT, ["serve"], candidate_settings,
                                    self.item.program.encode("utf-8", errors="surrogatepass"), out_write,
                                    (call_read, reply_write))
            problem = json.dumps({"prompt": self.item.prompt, "test": self.item.test,
                                  "entry_point": self.item.entry_point}).encode()
            harness_settings = {"parent_pid": os.getpid(), "call_fd": call_write, "reply_fd": reply_read,
                                "verdict_fd": verdict_write}
            judge = self._spawn(HARNESS_SCRIPT, [], harness_settings, problem, out_write,
                                (call_write, reply_read, verdict_write))
            for fd in (call_read, call_write, reply_read, reply_write):
                self._close(fd)
        for fd in (out_write, verdict_write):
            self._close(fd)
        output, reported, finished = self._collect(out_read, verdict_read, judge,
                                                   started + self.timeout + STARTUP_GRACE_S)
        candidate_code = _status_unreaped(candidate.pid)  # before our kill: did a limit end it?
        self._kill_all()
        codes = [process.wait() for process in self.processes]
        detail = output.decode("utf-8", errors="replace").strip()[-DETAIL_CHARS:]
        if not finished or (candidate_code in CPU_KILLS and reported != b"passed"):
            return ExecResult(False, "timeout", detail)
        if reported in (COMPILE_ERROR, b"error"):
            return ExecResult(False, "error", detail)
        if self.mode == "run":
            passed = judge.returncode == 0 and reported == token.encode()
        else:
            passed = judge.returncode == 0 and reported == b"passed"
        return ExecResult(passed, "passed" if passed else "failed",
                          detail if passed or detail else f"exit status {codes}")

    def _collect(self, out_read: int, verdict_read: int, judge: subprocess.Popen, deadline: float):
        """Read output (keeping its tail, closing it past the size limit) and the verdict until the judging
        process exits or the deadline passes; (output tail, verdict bytes, finished in time)."""
        tail, total, reported = bytearray(), 0, bytearray()
        selector = selectors.DefaultSelector()
        selector.register(out_read, selectors.EVENT_READ, "out")
        selector.register(verdict_read, selectors.EVENT_READ, "verdict")
        open_fds = {out_read, verdict_read}
        try:
            while True:
                exited = _exited(judge.pid)
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not exited:
                    return bytes(tail), bytes(reported), False
                events = selector.select(timeout=0 if exited else min(remaining, 0.05))
                if exited and not events:
                    return bytes(tail), bytes(reported), True
                for key, _ in events:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                        open_fds.discard(key.fd)
                    elif key.data == "verdict":
                        reported += chunk[:64]
                    else:
                        total += len(chunk)
                        tail = (tail + chunk)[-DETAIL_CHARS * 4:]
                        if total > OUTPUT_LIMIT_MB * 1024 * 1024:  # the writer gets EPIPE from now on
                            selector.unregister(key.fd)
                            open_fds.discard(key.fd)
                            self._close(key.fd)
                if not open_fds:  # every writer closed its end: only the exit is left to wait for
                    while not _exited(judge.pid):
                        if time.monotonic() >= deadline:
                            return bytes(tail), bytes(reported), False
                        time.sleep(0.002)
                    return bytes(tail), bytes(reported), True
        finally:
            selector.close()

    def _kill_all(self) -> None:
        """SIGKILL each process group while its leader is unreaped (so the group id is still ours). Inside
        a PID namespace, the death of its PID 1 kills everything else in it."""
        for process in self.processes:
            if process.returncode is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _status_unreaped(pid: int) -> int | None:
    """The child's exit status as Popen reports it (-signal when killed), None while it runs; not reaped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
