"""The kernel's confinement primitives for a sandboxed process, through ctypes (no root, no extra package).

Runs inside the sandbox's child processes only (imported by path, not as part of piece_cl), so it uses the
standard library alone. Every function either confines the calling process irreversibly or raises OSError:
the caller decides whether a missing feature is fatal (see sandbox.py's start-up check).

* namespaces: unprivileged user + mount + network + PID + IPC + UTS namespaces (`unshare(2)`);
* mounts: a private mount tree, a fresh /proc showing only the namespace's processes, a size-capped tmpfs
  as the only writable directory (it vanishes with the namespace: nothing is left on the host's disk);
* Landlock (ABI 1..7): file reads only below an allow-list, writes only below the work directory, no TCP
  bind/connect (ABI 4+), no signals or abstract unix sockets out of the domain (ABI 6+);
* seccomp-bpf (x86_64): EPERM for process creation, signals to others, sockets, device nodes and fifos,
  scheduling/priority calls, ptrace, mounts, namespace and limit changes, and changes of file metadata
  (mode, owner, times, extended attributes), which Landlock does not handle.
"""

import ctypes
import errno
import os
import struct
import sys

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long
_LIBC.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 16384, 1 << 18


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def die_with_parent(signal_number: int = 9) -> None:
    """PR_SET_PDEATHSIG: the kernel kills this process when the thread that started it ends."""
    _check(_LIBC.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def enter_namespaces() -> None:
    """New user (uid 0 inside, mapped to ours), mount, network, PID, IPC and UTS namespaces.

    The PID namespace applies to the next child: the caller must fork, and that child is its PID 1.
    """
    uid, gid = os.getuid(), os.getgid()
    _check(_LIBC.unshare(NAMESPACES), "unshare(user, mount, net, pid, ipc, uts)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = (lambda value: None if value is None else value.encode())
    _check(_LIBC.mount(encode(source), target.encode(), encode(fstype), flags, encode(data)), f"mount {target}")


def private_mounts(work_dir: str, size_bytes: int) -> str:
    """In the new mount namespace: /proc of this PID namespace only, a tmpfs at `work_dir`; returns how
    /proc was hidden ("proc": a fresh procfs; "tmpfs": an empty one, where the kernel refuses a procfs)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        proc = "proc"
    except OSError:
        _mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=555")
        proc = "tmpfs"
    _mount("tmpfs", work_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={size_bytes},mode=700")
    return proc


# --- Landlock ------------------------------------------------------------------------------------------
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_FILE_RIGHTS_V1 = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE
FS_ALL_V1 = (1 << 13) - 1  # execute, write, read file/dir, remove file/dir, make char/dir/reg/sock/fifo/block/sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
O_PATH = getattr(os, "O_PATH", 0o10000000)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is absent or disabled."""
    if sys.platform != "linux":
        return 0
    version = _LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


def _fs_rights(abi: int) -> int:
    rights = FS_ALL_V1
    rights |= FS_REFER if abi >= 2 else 0
    rights |= FS_TRUNCATE if abi >= 3 else 0
    rights |= FS_IOCTL_DEV if abi >= 5 else 0
    return rights


def _file_rights(abi: int) -> int:
    return FS_FILE_RIGHTS_V1 | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)


def landlock_restrict(readable: list[str], writable: list[str], abi: int) -> None:
    """Confine this process (and its future children): reads below `readable`, anything below `writable`,
    nothing else; no TCP (ABI 4+); signals and abstract unix sockets only within the domain (ABI 6+).
    Paths that do not exist are skipped. Needs no_new_privs (set here)."""
    handled_fs = _fs_rights(abi)
    attr = struct.pack("Q", handled_fs)
    if abi >= 4:
        attr += struct.pack("Q", NET_BIND_TCP | NET_CONNECT_TCP)
    if abi >= 6:
        attr += struct.pack("Q", SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(_LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(len(attr)), 0),
                     "landlock_create_ruleset")
    try:
        for path, writes in [(path, False) for path in readable] + [(path, True) for path in writable]:
            try:
                fd = os.open(path, O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if os.path.isdir(path):
                    rights = handled_fs if writes else FS_READ_DIR | FS_READ_FILE
                else:  # a rule on a file may carry file rights only
                    rights = _file_rights(abi) if writes else FS_READ_FILE
                rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
                _check(_LIBC.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0),
                       f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(_LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(_LIBC.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


# --- seccomp-bpf (Linux x86_64) ------------------------------------------------------------------------
# The kernel answers EPERM to these whatever the program does, native code included.
SYSCALLS_DENIED = {
    "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "kill": 62, "tkill": 200, "pidfd_open": 434,
    "pidfd_send_signal": 424, "pidfd_getfd": 438, "ptrace": 101, "process_vm_readv": 310,
    "process_vm_writev": 311, "process_madvise": 440, "kcmp": 312, "socket": 41, "socketpair": 53,
    "connect": 42, "setrlimit": 160, "setsid": 112, "setpgid": 109, "unshare": 272, "setns": 308,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "bpf": 321,
    "io_uring_setup": 425, "perf_event_open": 298, "userfaultfd": 323, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "reboot": 169,
    "mknod": 133, "mknodat": 259, "setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144,
    "sched_setaffinity": 203, "sched_setattr": 314, "ioprio_set": 251, "add_key": 248,
    "request_key": 249, "keyctl": 250, "name_to_handle_at": 303, "open_by_handle_at": 304, "acct": 163,
    "swapon": 167, "swapoff": 168, "personality": 135, "quotactl": 179, "settimeofday": 164,
    "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
    # Metadata changes, which Landlock does not cover (mode, owner, times, extended attributes): without
    # these a program could chmod 000 or re-date any file its user owns, or one it may only read.
    "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94,
    "fchownat": 260, "utime": 132, "utimes": 235, "futimesat": 261, "utimensat": 280, "setxattr": 188,
    "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199,
    "setxattrat": 463, "removexattrat": 466,
}
SYSCALL_CLONE, SYSCALL_CLONE3, SYSCALL_TGKILL, SYSCALL_PRLIMIT64 = 56, 435, 234, 302
AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, CLONE_THREAD = 0xC000003E, 0x40000000, 0x00010000
LOAD, JUMP_EQUAL, JUMP_AT_LEAST, JUMP_BITS_SET, RETURN = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW, KILL_PROCESS, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000


def seccomp_supported() -> bool:
    return sys.platform == "linux" and os.uname().machine == "x86_64"


def seccomp_program(own_pid: int) -> list[tuple[int, int, int, int]]:
    """BPF: other arch/x32 -> kill; denied calls -> EPERM; clone only for threads (clone3 -> ENOSYS, so
    glibc falls back to clone, whose flags are visible); tgkill only within this process; prlimit64
    only to read limits; everything else allowed. Offsets: nr 0, arch 4, args[i] 16+8i (low word first)."""
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


def install_seccomp() -> None:
    """Install the filter (irreversible for this process and its threads); OSError where it cannot."""
    if not seccomp_supported():
        raise OSError(errno.ENOSYS, "seccomp filter: only built for Linux x86_64")
    program = seccomp_program(os.getpid())
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.addressof(filters))
    _check(_LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_LIBC.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")
