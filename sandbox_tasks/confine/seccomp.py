"""seccomp: the system calls a tool's process never needs, refused with EPERM.

Built with libseccomp (through ``pyseccomp``) and loaded in the tool's own process, after
no_new_privs. The default is to allow; what is refused is what reaches outside the call:

- sockets: ``socket()`` of every family (the mediated fetch uses a socket pair made before
  the fork, inherited), ``socketpair()`` of any family but ``AF_UNIX`` (a pair reaches no
  one; asyncio's event loop needs one);
- other processes: ``ptrace``, ``process_vm_readv``/``writev``, ``kcmp``, ``pidfd_getfd``,
  and signals (and pidfds) aimed at the process that forked the tool, or at every process
  (``kill(-1)``): Landlock's signal scope (ABI 6) covers all the others; resource limits,
  priorities and scheduling of any process but the caller (``prlimit64``, ``setpriority``,
  ``ioprio_set``, ``sched_set*``: the kernel lets a process change them for every process
  of its user, the runner and the worker included, and neither Landlock nor bubblewrap's
  namespaces stop it);
- mounts and namespaces: ``mount`` and the new mount API, ``umount2``, ``pivot_root``,
  ``chroot``, ``unshare``, ``setns``, ``clone`` with any ``CLONE_NEW*`` flag; ``clone3``
  answers ENOSYS (its flags sit in memory seccomp cannot read), so libc falls back to
  ``clone``;
- the kernel's own surfaces: keyrings, ``bpf``, ``perf_event_open``, ``userfaultfd``,
  ``io_uring_*``, modules, ``kexec_*``, ``open_by_handle_at``, ``fanotify_init``, SysV
  IPC and POSIX message queues (shared with every process without an IPC namespace),
  clocks, swap, reboot, ``iopl``/``ioperm``, ``TIOCSTI``/``TIOCLINUX`` on terminals,
  and ``personality`` flags that weaken the address space (ASLR off, READ_IMPLIES_EXEC).

System calls of another ABI (32-bit calls from a 64-bit process) kill the process, so
none goes around the list.
"""

from __future__ import annotations

import ctypes.util
import errno
import os
import socket
import sys
import tempfile
from typing import Any

__all__ = [
    "DENIED",
    "SeccompError",
    "available",
    "compile_for_children",
    "install",
    "load_library",
]

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

DENIED = (
    # other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    # mounts, roots, namespaces
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    # keyrings
    "keyctl",
    "add_key",
    "request_key",
    # the kernel's own surfaces
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    "lookup_dcookie",
    "quotactl",
    "quotactl_fd",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    "vhangup",
    "uselib",
    "modify_ldt",
    # SysV IPC and POSIX message queues: shared with the host without an IPC namespace
    "shmget",
    "shmat",
    "shmctl",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    # sockets (socketpair: below)
    "socket",
)

CLONE_NAMESPACES = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
# system calls that may name another process in their first argument; allowed only with 0
# (the caller): glibc's setrlimit/getrlimit are prlimit64(0, ...)
OWN_PROCESS_ONLY = (
    "prlimit64",
    "sched_setaffinity",
    "sched_setparam",
    "sched_setscheduler",
    "sched_setattr",
)
PRIO_PROCESS = 0  # setpriority(which, who, ...): PRIO_PROCESS with who 0 is the caller
IOPRIO_WHO_PROCESS = 1
PERSONALITY_QUERY = 0xFFFFFFFF
PERSONALITY_RISKY = (
    0x0040000,  # ADDR_NO_RANDOMIZE
    0x0100000,  # MMAP_PAGE_ZERO
    0x0200000,  # ADDR_COMPAT_LAYOUT
    0x0400000,  # READ_IMPLIES_EXEC
    0x0800000,  # ADDR_LIMIT_32BIT
    0x8000000,  # ADDR_LIMIT_3GB
)
TERMINAL_INJECTION = (0x5412, 0x541C)  # TIOCSTI, TIOCLINUX
LOW32 = 0xFFFFFFFF


class SeccompError(OSError):
    """libseccomp is missing here, or the filter could not be built or loaded."""


SONAMES = {"seccomp": "libseccomp.so.2", "c": "libc.so.6"}


def _library() -> Any:
    """pyseccomp, loaded once per process (call it before Landlock closes the file system).

    pyseccomp finds libseccomp with ``ctypes.util.find_library``, which asks ``ldconfig -p``
    (or a compiler): inside bubblewrap there is no ``/etc/ld.so.cache`` and no compiler,
    while the dynamic loader still finds ``libseccomp.so.2`` on its own search path; so
    the soname stands in where ``find_library`` finds nothing.
    """
    if "pyseccomp" in sys.modules:
        return sys.modules["pyseccomp"]
    original = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return original(name) or SONAMES.get(name)

    ctypes.util.find_library = find_library
    try:
        import pyseccomp  # type: ignore[import-untyped]
    except (ImportError, RuntimeError, OSError) as e:  # RuntimeError: no libseccomp.so
        raise SeccompError(0, f"seccomp: libseccomp is not usable here ({e})") from e
    finally:
        ctypes.util.find_library = original
    return pyseccomp


def load_library() -> None:
    """Load libseccomp now (before Landlock), so that ``install`` opens no file."""
    _library()


def available() -> str | None:
    """None if a filter can be built here (libseccomp loads), else why not."""
    try:
        _library()
    except SeccompError as e:
        return str(e)
    return None


def _rules(lib: Any, ppid: int) -> list[tuple[int, str, tuple[Any, ...]]]:
    eperm = lib.ERRNO(errno.EPERM)
    arg = lib.Arg
    rules: list[tuple[int, str, tuple[Any, ...]]] = [(eperm, name, ()) for name in DENIED]
    rules.append((lib.ERRNO(errno.ENOSYS), "clone3", ()))
    rules += [(eperm, "clone", (arg(0, lib.MASKED_EQ, flag, flag),)) for flag in CLONE_NAMESPACES]
    rules.append((eperm, "socketpair", (arg(0, lib.NE, socket.AF_UNIX),)))
    rules += [
        (eperm, "ioctl", (arg(1, lib.MASKED_EQ, LOW32, request),)) for request in TERMINAL_INJECTION
    ]
    # personality: the query (0xffffffff) and harmless values pass; a value with a risky
    # flag, or with bit 31 set that is not the query, is refused (libseccomp allows one
    # comparison per argument and rule, hence one rule per bit)
    top = 0x80000000
    rules += [
        (eperm, "personality", (arg(0, lib.MASKED_EQ, bit | top, bit),))
        for bit in PERSONALITY_RISKY
    ]
    rules += [
        (eperm, "personality", (arg(0, lib.MASKED_EQ, top | (1 << bit), top),)) for bit in range(31)
    ]
    # signals at the process that forked the tool, or at every process
    for target in {ppid, LOW32}:
        match = arg(0, lib.MASKED_EQ, LOW32, target)
        rules += [(eperm, name, (match,)) for name in ("kill", "tkill", "tgkill")]
        rules += [(eperm, name, (match,)) for name in ("rt_sigqueueinfo", "rt_tgsigqueueinfo")]
    rules.append((eperm, "pidfd_open", (arg(0, lib.MASKED_EQ, LOW32, ppid),)))
    # limits, priorities and scheduling: of the calling process only (0 names it)
    rules += [(eperm, name, (arg(0, lib.NE, 0),)) for name in OWN_PROCESS_ONLY]
    rules += [(eperm, name, (arg(1, lib.NE, 0),)) for name in ("setpriority", "ioprio_set")]
    rules.append((eperm, "setpriority", (arg(0, lib.NE, PRIO_PROCESS),)))
    rules.append((eperm, "ioprio_set", (arg(0, lib.NE, IOPRIO_WHO_PROCESS),)))
    return rules


def _build(lib: Any, ppid: int) -> Any:
    flt = lib.SyscallFilter(lib.ALLOW)
    flt.set_attr(lib.Attr.ACT_BADARCH, lib.KILL_PROCESS)  # a 32-bit call from 64-bit code
    for action, name, args in _rules(lib, ppid):
        number = lib.resolve_syscall(lib.Arch.NATIVE, name)
        if number < 0:
            continue  # not a system call of this architecture (iopl on aarch64, ...)
        flt.add_rule(action, number, *args)
    return flt


# The program built once by the process that forks the calls (``compile_for_children``):
# (that process's pid, the classic BPF program libseccomp generated for its children).
_compiled: tuple[int, bytes] | None = None


def compile_for_children() -> None:
    """In the process that forks the calls (the runner): build the filter for children of
    this process once. Each child then loads that program as it is (microseconds) instead
    of having libseccomp build it again (about 2.5 ms a call). The program is the one
    libseccomp would load (``seccomp_export_bpf``); it names this process as the parent
    whose signals are refused, so a child of any other process builds its own."""
    global _compiled
    lib = _library()
    try:
        flt = _build(lib, os.getpid())
        with tempfile.TemporaryFile() as out:
            flt.export_bpf(out)
            out.seek(0)
            program = out.read()
    except OSError as e:
        raise SeccompError(e.errno or 0, f"seccomp: {e.strerror or e}") from e
    if not program or len(program) % SOCK_FILTER_SIZE or len(program) // SOCK_FILTER_SIZE > 4096:
        raise SeccompError(0, f"seccomp: libseccomp exported {len(program)} bytes, not a program")
    _compiled = (os.getpid(), program)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_program(program: bytes) -> None:
    """``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prog)``: no_new_privs must be set."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // SOCK_FILTER_SIZE, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(err, f"seccomp: loading the filter: {os.strerror(err)}")


def install() -> None:
    """Load the filter into the calling thread (and all it starts), for good.

    no_new_privs must be set first (or the caller must have CAP_SYS_ADMIN). A child of the
    process that compiled the filter (``compile_for_children``) loads that program.
    """
    if _compiled is not None and _compiled[0] == os.getppid():
        _load_program(_compiled[1])
        return
    lib = _library()
    try:
        _build(lib, os.getppid()).load()
    except OSError as e:
        raise SeccompError(e.errno or 0, f"seccomp: {e.strerror or e}") from e
