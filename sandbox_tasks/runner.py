"""The runner: a process that runs one tool's calls for one tenant, then is checked.

Started by a :class:`sandbox_tasks.runners.RunnerExecutor` as a fresh process (never a
fork of the worker): under bubblewrap (``sandbox_tasks.bwrap``) or, where namespaces
cannot be made, as a plain process (``sandbox_tasks.plain``). Either way it starts with
``python -I`` (no environment variables, no user site, no script or working directory on
``sys.path``) through ``BOOTSTRAP``, which puts only the code directories it is given on
``sys.path``, makes the process not dumpable (its ``/proc/<pid>/fd``, ``mem`` and
``environ`` are then closed to a call running as the same user) and ties its life to the
worker's. It reads framed requests on stdin and answers on stdout (one socket: its
``/proc`` entry cannot be opened as a file even where the process is reachable); each call
runs in a forked child with the tool's rlimits, in a fresh scratch directory that is
removed after it (``ForkExecutor``).

After each call it reaps whatever the call orphaned (it is their subreaper; under
bubblewrap it is the namespace's PID 1) and compares its scratch root, the one place it
can write, with what was there when it became ready: its answer says what it found, and
the worker replaces a runner that is not clean.

Frames: see ``sandbox_tasks.frames``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from sandbox_tasks import frames, prctl
from sandbox_tasks.confine import seccomp
from sandbox_tasks.executor import ForkExecutor
from sandbox_tasks.registry import ToolContext, constrained, load_tools

# The sandbox's own private tmpfs, its one writable place: not /tmp, where the host's code
# or data may live (a checkout in mktemp -d): bwrap would make the directories leading to
# their mounts on the tmpfs, writable, and one of them is on the runner's sys.path.
SANDBOX_TMP = Path("/scratch")
MAX_LISTED = 2000  # a scratch root with more entries than this counts as not clean
REAP_GRACE_S = 0.05  # orphans killed with their call get this long to be reaped
KILL_ORPHANS_S = 5.0  # then the rest are killed, for at most this long

# python -I -c BOOTSTRAP CODE_DIRS ARGS...: not dumpable and tied to its parent before any
# import, then only CODE_DIRS (":"-separated) in front of the interpreter's own paths.
BOOTSTRAP = (
    "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
    "libc.prctl(4, 0, 0, 0, 0) == 0 or sys.exit('runner: cannot clear dumpable'); "
    "libc.prctl(1, 9, 0, 0, 0); "
    "sys.path[:0] = [p for p in sys.argv[1].split(':') if p]; "
    "from sandbox_tasks.runner import main; sys.exit(main(sys.argv[2:]))"
)

__all__ = ["BOOTSTRAP", "SANDBOX_TMP", "main", "read_frame", "runner_argv", "write_frame"]


def runner_argv(
    *,
    python: str,
    code_paths: list[str],
    tool: str,
    roots: Mapping[str, Path],
    extra_modules: list[str],
    scratch_root: Path,
    layers: Sequence[str],
) -> list[str]:
    """The runner's command line (after any wrapper such as bwrap); ``layers``: the kernel
    layers each call's process gets (``sandbox_tasks.confine``), as the receipts name them."""
    return [
        python, "-I", "-B", "-c", BOOTSTRAP, ":".join(code_paths),
        tool, json.dumps({name: str(path) for name, path in roots.items()}),
        ",".join(extra_modules), str(scratch_root), ",".join(layers),
    ]  # fmt: skip


def read_frame(stream: BinaryIO) -> Any | None:
    header = stream.read(frames.HEADER)
    if len(header) < frames.HEADER:
        return None
    size = frames.body_size(header)
    body = stream.read(size)
    return None if len(body) < size else frames.decode(body)


def write_frame(stream: BinaryIO, value: Any) -> None:
    stream.write(frames.encode(value))
    stream.flush()


def snapshot(root: Path) -> dict[str, tuple[int, int, int]] | None:
    """Every path under ``root`` with its mode, size and mtime; None if there are too many."""
    seen: dict[str, tuple[int, int, int]] = {}
    for top, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(top, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            seen[os.path.relpath(path, root)] = (info.st_mode, info.st_size, info.st_mtime_ns)
            if len(seen) > MAX_LISTED:
                return None
    return seen


def _children() -> set[int]:
    """Our children now (every thread's: an orphan may be given to any of them)."""
    found: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            listed = Path(f"/proc/self/task/{tid}/children").read_text().split()
            found.update(int(p) for p in listed)
        except (OSError, ValueError):
            continue
    return found


def reap_orphans() -> bool:
    """Reap what the last call left as our children; True if any was still alive.

    Whatever is still alive after ``REAP_GRACE_S`` is killed, and so is whatever it leaves
    to us in turn (we are its subreaper), until none is left or ``KILL_ORPHANS_S`` ran out:
    where the worker has no cgroup to sweep, nothing else would end a process that left
    the call's process group (``setsid``), and it would outlive the runner."""
    grace = time.monotonic() + REAP_GRACE_S
    give_up = grace + KILL_ORPHANS_S
    alive = False
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return alive
        if pid != 0:
            continue
        now = time.monotonic()
        if now > give_up:
            return True
        if now > grace:
            alive = True
            for child in _children():
                with contextlib.suppress(OSError):
                    os.kill(child, signal.SIGKILL)
        time.sleep(0.002)


def changes(root: Path, baseline: dict[str, tuple[int, int, int]] | None) -> list[str]:
    now = snapshot(root)
    if now is None or baseline is None:
        return [f"more than {MAX_LISTED} entries"]
    changed = sorted(p for p in now.keys() | baseline.keys() if now.get(p) != baseline.get(p))
    return changed[:20]


def main(argv: list[str]) -> int:
    prctl.set_not_dumpable()
    prctl.set_child_subreaper()
    tool_name, extra = argv[0], argv[2]
    roots = {name: Path(path) for name, path in json.loads(argv[1]).items()}  # the tool's own
    scratch_root, layers = Path(argv[3]), tuple(n for n in argv[4].split(",") if n)
    spec = load_tools([m for m in extra.split(",") if m])[tool_name]
    executor = ForkExecutor(scratch_root=scratch_root, layers=layers)
    if "seccomp" in layers:  # built once here; each call's process loads it as it is
        try:
            seccomp.compile_for_children()
        except seccomp.SeccompError as e:  # each call builds its own (and fails closed)
            print(f"runner: seccomp filter not precompiled: {e}", file=sys.stderr)
    base = ToolContext(
        scratch_dir=scratch_root,
        repo_root=roots.get("repo"),
        docs_root=roots.get("docs"),
        roots=roots,
    )
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    if spec.prepare is not None:  # build what the tool keeps (an index, ...) before serving
        try:
            spec.prepare(base)
        except Exception as e:  # the call that needs it reports the error again
            print(f"runner: prepare failed: {type(e).__name__}: {e}", file=sys.stderr)
    baseline = snapshot(scratch_root)
    gc.freeze()  # what the runner holds by now is never collected, nor copied by a collection
    write_frame(stdout, {"ready": tool_name, "pid": os.getpid(), "dumpable": prctl.dumpable()})
    while True:
        request = read_frame(stdin)
        if request is None:
            return 0
        try:
            args = spec.args_model.model_validate(request["args"])
        except ValidationError as e:
            write_frame(stdout, {"ok": False, "code": "invalid_argument", "message": str(e)[:2000]})
            continue

        def relay(request: dict[str, Any]) -> dict[str, Any]:
            """Egress crosses to the worker, which decides, fetches and records."""
            write_frame(stdout, {"fetch": request})
            answer = read_frame(stdin)
            return answer if isinstance(answer, dict) else {"ok": False, "code": "tool_error"}

        # Every fetch crosses to the worker, which checks it against the allowlist.
        call_spec = spec
        if isinstance(request.get("limits"), dict):
            call_spec = constrained(spec, request["limits"], None)
        outcome = executor.run(call_spec, args, base, fetcher=relay)
        write_frame(
            stdout,
            {
                "ok": outcome.ok,
                "result": outcome.result,
                "code": outcome.error_code,
                "message": outcome.error_message,
                "orphans": reap_orphans(),
                "left": changes(scratch_root, baseline),
            },
        )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
