"""A tool that has got out of its sandbox into the worker (security tests only).

Loaded with TOOLPLANE_EXTRA_TOOLS=tests.escape_tools. Code in a tool plugin's module runs
in the worker itself when the worker imports it, outside any sandbox, with the worker's
user, groups, files and environment; so does a tool that breaks out of bubblewrap. This
module stands for either: imported in a worker process (its entry point has loaded
``sandbox_tasks.main``), it swaps the executor of its tool ``escapee`` for a plain fork of
the worker, so each call runs with whatever the worker process may do, and every receipt
says so (containment ``escaped (test)``). Other tools of the same worker are untouched.

Each action reports what the tool saw: for every path, what it read, or the errno it got.
"""

from __future__ import annotations

import errno
import os
import sys

from pydantic import BaseModel, ConfigDict, Field

from sandbox_tasks.registry import Limits, ToolContext, ToolSpec

CONTAINMENT = "escaped (test)"


class EscapeArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    action: str
    paths: list[str] = Field(default_factory=list, max_length=2000)


class EscapeResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    uid: int
    gids: list[int]
    seen: dict[str, dict[str, object]]


def _read(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError as e:
        return {"errno": errno.errorcode.get(e.errno or 0, str(e.errno)), "error": str(e)}
    return {"read": len(data), "text": data[:20_000].decode(errors="replace").replace("\0", "\n")}


def _list(path: str) -> dict[str, object]:
    try:
        return {"entries": sorted(os.listdir(path))}
    except OSError as e:
        return {"errno": errno.errorcode.get(e.errno or 0, str(e.errno)), "error": str(e)}


def escapee(args: EscapeArgs, ctx: ToolContext) -> EscapeResult:
    act = {"read": _read, "list": _list}.get(args.action)
    if act is None:
        raise ValueError(f"unknown action {args.action!r}")
    # "{worker}": the worker's pool process, which forked this call (its environment is the
    # worker's).
    seen = {p: act(p.replace("{worker}", str(os.getppid()))) for p in args.paths}
    return EscapeResult(uid=os.getuid(), gids=sorted({os.getgid(), *os.getgroups()}), seen=seen)


TOOLS = [
    ToolSpec(
        name="escapee",
        version="1.0.0",
        description="Reads what a tool that got out of its sandbox could (security tests only).",
        args_model=EscapeArgs,
        result_model=EscapeResult,
        func=escapee,
        limits=Limits(timeout_s=20, cpu_s=10, output_bytes=4_000_000),
    )
]


def _escape() -> None:
    main = sys.modules.get("sandbox_tasks.main")
    if main is None or getattr(main.make_executor, "escaped", False):
        return  # not a worker process (the control, the sandbox's runner), or done already
    from sandbox_tasks.executor import ForkExecutor

    contained = main.make_executor

    def make_executor(settings, spec, scratch):  # type: ignore[no-untyped-def]
        if spec.name != "escapee":
            return contained(settings, spec, scratch)
        return ForkExecutor(scratch_root=scratch, containment=CONTAINMENT)

    make_executor.escaped = True  # type: ignore[attr-defined]
    main.make_executor = make_executor


_escape()
