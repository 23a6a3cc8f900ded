"""A hostile tool for the container tests: what an exploited tool would try in a worker.

Mounted read-only into the probe worker's image as the module
``toolplane_container_probe`` (in the venv's site-packages) and loaded with
``TOOLPLANE_EXTRA_TOOLS``. Each attempt is reported as "ok: ..." when it worked, or as
what stopped it (an errno's name, ``MemoryError``, a fork count and errno). Nothing of
this module imports the test suite: it runs inside the container.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sandbox_tasks.registry import Limits, ToolContext, ToolSpec

__all__ = ["TOOLS"]


class Attempt(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    action: str  # read, list, write, connect, fork_bomb, memory
    target: str = ""


class ProbeArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    attempts: list[Attempt] = Field(max_length=100)


class ProbeResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    seen: dict[str, str]


def _errno(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, type(e).__name__)


def _fork_bomb(limit: int) -> str:
    """Fork children that wait, up to ``limit``; report how many the kernel allowed."""
    children = []
    try:
        for _ in range(limit):
            pid = os.fork()
            if pid == 0:
                time.sleep(5)
                os._exit(0)
            children.append(pid)
        return f"ok: {len(children)} processes"
    except OSError as e:
        return f"{_errno(e)} after {len(children)} forks"
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def _memory(mib: int) -> str:
    chunks = []
    try:
        for _ in range(mib // 64):
            chunks.append(bytearray(64 << 20))
        return f"ok: {mib} MiB"
    except MemoryError:
        return f"MemoryError after {len(chunks) * 64} MiB"
    finally:
        chunks.clear()


def _attempt(action: str, target: str) -> str:
    if action == "read":
        return f"ok: {Path(target).read_bytes()[:120].decode(errors='replace')}"
    if action == "list":
        return f"ok: {sorted(os.listdir(target))[:20]}"
    if action == "write":
        Path(target).write_text("planted by a tool")
        return "ok"
    if action == "connect":
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return "ok"
    if action == "fork_bomb":
        return _fork_bomb(int(target))
    if action == "memory":
        return _memory(int(target))
    raise ValueError(f"unknown action {action!r}")


def container_probe(args: ProbeArgs, ctx: ToolContext) -> ProbeResult:
    seen = {}
    for attempt in args.attempts:
        target = attempt.target.replace("{scratch}", str(ctx.scratch_dir))
        key = f"{attempt.action} {attempt.target}"
        try:
            seen[key] = _attempt(attempt.action, target)
        except OSError as e:
            seen[key] = _errno(e)
    return ProbeResult(seen=seen)


TOOLS = [
    ToolSpec(
        name="container_probe",
        version="1.0.0",
        description="Tries what an exploited tool would, inside a worker container (tests only).",
        args_model=ProbeArgs,
        result_model=ProbeResult,
        func=container_probe,
        limits=Limits(timeout_s=20, cpu_s=10, memory_mb=512, output_bytes=200_000),
    )
]
