"""A probe tool for workers without bubblewrap (security tests only).

Loaded with TOOLPLANE_EXTRA_TOOLS=...,tests.layer_tools. In a worker process whose
environment has TP_TEST_NO_BWRAP=1, importing this module makes the worker find no
bubblewrap, as in a container where it cannot make namespaces: the worker then runs each
call in a fork of itself (TOOLPLANE_ALLOW_WEAK_CONTAINMENT), under the kernel layers
alone. The tool ``confined_probe`` tries what an exploited tool would, and reports for
each attempt "ok" or the errno it got.

Placeholders in targets: ``{worker}`` is the process that forked the call (the worker's
pool process, holding the broker URL in its environment and the receipt key in memory).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sandbox_tasks.registry import Limits, ToolContext, ToolSpec

NO_BWRAP = "bubblewrap disabled by the test (as in a container without namespaces)"


class Attempt(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    action: str  # read, list, write, socket, connect, vm_read, sigstop
    target: str = ""


class ProbeArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    attempts: list[Attempt] = Field(max_length=200)


class ProbeResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    seen: dict[str, str]  # "action target" -> "ok: ..." or the errno's name


def _errno(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _vm_read(pid: int) -> None:
    """process_vm_readv of 16 bytes at an address the worker has too (the call is its fork)."""
    here = ctypes.create_string_buffer(16)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(here), 16)
    remote = (ctypes.c_void_p * 2)(id(sys.modules), 16)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    args = [ctypes.c_long(310), ctypes.c_long(pid), local, ctypes.c_long(1), remote]
    if libc.syscall(*args, ctypes.c_long(1), ctypes.c_long(0)) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _attempt(action: str, target: str) -> str:
    if action == "read":
        return f"ok: {Path(target).read_bytes()[:200].decode(errors='replace')}"
    if action == "list":
        return f"ok: {sorted(os.listdir(target))[:20]}"
    if action == "write":
        Path(target).write_text("planted by a tool")
        return "ok"
    if action == "socket":
        socket.socket(getattr(socket, target)).close()
        return "ok"
    if action == "connect":
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return "ok"
    if action == "vm_read":
        _vm_read(int(target))
        return "ok"
    if action == "sigstop":
        os.kill(int(target), signal.SIGSTOP)
        os.kill(int(target), signal.SIGCONT)  # it was not refused: let the worker go on
        return "ok"
    raise ValueError(f"unknown action {action!r}")


def confined_probe(args: ProbeArgs, ctx: ToolContext) -> ProbeResult:
    seen = {}
    for attempt in args.attempts:
        target = attempt.target.replace("{worker}", str(os.getppid()))
        target = target.replace("{scratch}", str(ctx.scratch_dir))
        try:
            seen[f"{attempt.action} {attempt.target}"] = _attempt(attempt.action, target)
        except OSError as e:
            seen[f"{attempt.action} {attempt.target}"] = _errno(e)
    return ProbeResult(seen=seen)


TOOLS = [
    ToolSpec(
        name="confined_probe",
        version="1.0.0",
        description="Tries what an exploited tool would, without namespaces (tests only).",
        args_model=ProbeArgs,
        result_model=ProbeResult,
        func=confined_probe,
        limits=Limits(timeout_s=10, cpu_s=5, output_bytes=200_000),
        data_root="repo",
    )
]


def _no_bwrap() -> None:
    main = sys.modules.get("sandbox_tasks.main")
    if main is None or os.environ.get("TP_TEST_NO_BWRAP") != "1":
        return  # not a worker of the test's stack without bubblewrap
    main.probe_bwrap = lambda binary: NO_BWRAP


_no_bwrap()
