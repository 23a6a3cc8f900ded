"""The two process attributes the sandbox sets through prctl(2).

- not dumpable: the kernel makes ``/proc/<pid>/`` entries (fd, mem, environ, ...) owned
  by root and refuses ptrace by processes without CAP_SYS_PTRACE, so a tool running as
  the same user cannot open the process's pipes or read its memory;
- no_new_privs: nothing this process executes gains privileges (set-uid, file
  capabilities); the kernel requires it before an unprivileged seccomp filter or
  Landlock domain.

The sandbox's runner also sets two more: it is the child subreaper of its calls (a
process a call orphans becomes the runner's child, not init's, so the runner reaps
it), and it dies with the process that started it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36

__all__ = [
    "dumpable",
    "no_new_privs",
    "set_child_subreaper",
    "set_death_signal",
    "set_no_new_privs",
    "set_not_dumpable",
]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int


def _prctl(option: int, arg: int = 0) -> int:
    result = _libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")
    return int(result)


def set_not_dumpable() -> None:
    _prctl(PR_SET_DUMPABLE, 0)


def dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE) == 1


def set_no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def no_new_privs() -> bool:
    return _prctl(PR_GET_NO_NEW_PRIVS) == 1


def set_child_subreaper() -> None:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_death_signal(signum: int) -> None:
    """``signum`` is sent to this process when the thread that started it exits."""
    _prctl(PR_SET_PDEATHSIG, signum)
