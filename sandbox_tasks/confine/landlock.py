"""Landlock: the tool's process sees only the trees it is given, and reaches nothing else.

Through the three system calls (``landlock_create_ruleset``, ``landlock_add_rule``,
``landlock_restrict_self``), for every ABI version from 1 to 7:

- file system (ABI 1; ``REFER`` from 2, ``TRUNCATE`` from 3, ``IOCTL_DEV`` from 5): every
  right the ABI knows is handled; read-only trees get read and execute, the call's scratch
  gets read and write (not execute); everything else is refused with EACCES: key files,
  the worker's home, ``/proc`` (so no other process's ``environ``, ``mem`` or ``fd``);
- network (ABI 4): TCP bind and connect are handled and no port is allowed;
- scopes (ABI 6): no signal to a process outside the domain (the runner, the worker: no
  SIGSTOP), no connection to an abstract UNIX socket made outside it.

Landlock also refuses ``ptrace`` (and ``/proc/<pid>/mem``-style access) to any process
outside the domain, at every ABI. Rights beyond the ABI applied are left unhandled, as
the kernel requires; the ABI applied is the highest both the kernel and this module know.

No maintained PyPI binding covers ABI 6 scopes (``landlock`` is a pre-release,
``py-landlock`` and ``landlockpy`` are new one-person projects); the ABI is three system
calls and three structs, so they are called here through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MAX_ABI", "LandlockError", "abi", "restrict"]

MAX_ABI = 7  # the highest ABI this module knows (ABI 7 adds audit flags, no new rights)

# x86_64, aarch64 and riscv64 share the generic numbers for these calls
_SYSCALLS = {"create_ruleset": 444, "add_rule": 445, "restrict_self": 446}
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1

# file system rights, with the ABI that introduced them
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
# rights that a rule on a file (not a directory) may carry
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

READ_ONLY = EXECUTE | READ_FILE | READ_DIR
READ_WRITE = (
    READ_FILE
    | READ_DIR
    | WRITE_FILE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SYM
    | MAKE_FIFO
    | REFER
    | TRUNCATE
)  # no EXECUTE (nothing dropped in scratch runs), no sockets, no device nodes


class LandlockError(OSError):
    """Landlock is missing here, or a step of restricting the process failed."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),  # ABI 4
        ("scoped", ctypes.c_uint64),  # ABI 6
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in <linux/landlock.h>
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(name: str, *args: object) -> int:
    if platform.machine() not in ("x86_64", "aarch64", "riscv64"):
        raise LandlockError(0, f"Landlock through ctypes is not wired for {platform.machine()}")
    result = int(_libc.syscall(ctypes.c_long(_SYSCALLS[name]), *args))
    if result < 0:
        errno = ctypes.get_errno()
        raise LandlockError(errno, f"landlock_{name}: {os.strerror(errno)}")
    return result


def abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or disabled."""
    try:
        return _syscall("create_ruleset", None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    except LandlockError:
        return 0


def handled_fs(version: int) -> int:
    """Every file system right that ABI ``version`` knows."""
    return _FS_BY_ABI[max(v for v in _FS_BY_ABI if v <= version)]


def _attr(version: int) -> tuple[_RulesetAttr, int]:
    """The ruleset for ABI ``version`` and the size to pass (older kernels refuse a larger
    struct, so only the fields that ABI has)."""
    attr = _RulesetAttr(handled_access_fs=handled_fs(version))
    size = 8
    if version >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # and no port is allowed
        size = 16
    if version >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    return attr, size


def _add_path(ruleset: int, path: Path, access: int, handled: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise LandlockError(e.errno or 0, f"landlock: cannot open {path}: {e.strerror}") from e
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=access & handled, parent_fd=fd)
        if rule.allowed_access:
            _syscall(
                "add_rule",
                ctypes.c_int(ruleset),
                ctypes.c_int(_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            )
    finally:
        os.close(fd)


def restrict(
    *,
    read_only: Iterable[Path],
    read_write: Iterable[Path],
    version: int,
) -> None:
    """Restrict the calling thread (and all it starts) at ABI ``version`` for good.

    no_new_privs must be set first (or the caller must have CAP_SYS_ADMIN).
    """
    if not 1 <= version <= MAX_ABI:
        raise LandlockError(0, f"landlock: no ABI {version} (this module knows 1 to {MAX_ABI})")
    have = abi()
    if have < version:
        raise LandlockError(0, f"landlock: ABI {version} asked, the kernel has {have or 'none'}")
    attr, size = _attr(version)
    ruleset = _syscall("create_ruleset", ctypes.byref(attr), ctypes.c_size_t(size), 0)
    try:
        for path in read_only:
            _add_path(ruleset, Path(path), READ_ONLY, attr.handled_access_fs)
        for path in read_write:
            _add_path(ruleset, Path(path), READ_WRITE, attr.handled_access_fs)
        _syscall("restrict_self", ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
