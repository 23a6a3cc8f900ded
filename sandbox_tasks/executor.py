"""The contained executor: each call runs in a forked child with resource limits.

The child gets a clean environment, a private scratch directory as its working
directory, and setrlimit caps on CPU time, address space, written file size,
open files and core dumps; it closes every descriptor it inherited but its
outcome pipe and its fetch channel, and then applies the kernel layers it was
given (no_new_privs, Landlock, seccomp: ``sandbox_tasks.confine``) before the
tool runs. The parent enforces the wall time (killing the child's whole process
group) and the cap on the size of what it returns. The child sends its outcome
over a pipe as JSON; the parent parses it strictly.

A worker never runs this in its own process: the runner (``sandbox_tasks.runner``), a
fresh process under bubblewrap or without namespaces, does, and the worker sweeps the
runner's cgroup after each call (a process group is no boundary: a call can leave it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import resource
import select
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sandbox_tasks import egress
from sandbox_tasks.channel import Fetcher, child_fetch, recv_frame, send_frame
from sandbox_tasks.confine import Confinement, ConfinementError, confine, seccomp
from sandbox_tasks.confine import containment as containment_name
from sandbox_tasks.confine.trees import read_only_trees
from sandbox_tasks.errors import ToolFailure
from sandbox_tasks.registry import ToolContext, ToolSpec
from toolplane.canonical import (
    CanonicalJSONError,
    canonical_json,
    contains_nul,
    parse_json_strict,
)

CONTAINMENT = "fork-rlimits"

__all__ = ["CONTAINMENT", "ForkExecutor", "Outcome"]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    fetches: tuple[dict[str, Any], ...] = ()  # egress carried out for the call


def _limits(spec: ToolSpec) -> dict[int, tuple[int, int]]:
    limits = spec.limits
    mem = limits.memory_mb * 1024 * 1024
    return {
        resource.RLIMIT_CPU: (limits.cpu_s, limits.cpu_s + 1),
        resource.RLIMIT_AS: (mem, mem),
        resource.RLIMIT_FSIZE: (limits.file_bytes, limits.file_bytes),
        resource.RLIMIT_NOFILE: (limits.open_files, limits.open_files),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NPROC: (limits.processes, limits.processes),
    }


def _close_inherited(keep: set[int]) -> None:
    """Close every descriptor but stdio and ``keep``: a fork of the worker holds its broker
    connection, its log files and anything else the worker had open."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    top = 1 << 20 if hard == resource.RLIM_INFINITY else min(max(hard, 65536), 1 << 20)
    low = 3
    for fd in sorted(keep | {top}):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1


def _child(
    spec: ToolSpec,
    args: BaseModel,
    ctx: ToolContext,
    out_fd: int,
    *,
    layers: tuple[str, ...] = (),
    keep_fds: tuple[int, ...] = (),
    read_only: tuple[Path, ...] | None = None,
) -> None:
    """Runs in the forked child; never returns.

    The tool runs only once every layer in ``layers`` (and the rlimits) holds; if one
    cannot be applied the call fails with ``confinement failed``, the tool never starts.
    ``read_only``: the trees the call may read, as the parent computed them (else here).
    """
    status = 0
    # What the child inherited is never collected here: a collection would walk (and so
    # copy, page by page) the parent's whole heap. The tool's own objects still are.
    gc.freeze()
    try:
        os.setsid()
        # stdin/stdout/stderr may be a runner's protocol pipes or the worker's log:
        # a tool that reads or prints gets /dev/null instead.
        null_in, null_out = os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null_in, 0)
        os.dup2(null_out, 1)
        os.dup2(null_out, 2)
        _close_inherited({out_fd, *keep_fds})
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(ctx.scratch_dir)})
        os.chdir(ctx.scratch_dir)
        try:
            confine(
                Confinement(
                    read_only=read_only if read_only is not None else read_only_trees(spec, ctx),
                    read_write=(Path(ctx.scratch_dir).resolve(),),
                    rlimits=_limits(spec),
                    layers=("rlimits", *layers),
                )
            )
        except (ConfinementError, ValueError) as e:  # fail closed: the tool never runs
            failure = {"ok": False, "code": "tool_error", "message": f"confinement failed: {e}"}
            body = canonical_json(failure)
        else:
            body = _run_tool(spec, args, ctx)
        view = memoryview(body)
        while view:
            written = os.write(out_fd, view)
            view = view[written:]
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        status = 70
    finally:
        os._exit(status)


def _run_tool(spec: ToolSpec, args: BaseModel, ctx: ToolContext) -> bytes:
    """The tool's call, as the outcome's canonical JSON."""
    limits = spec.limits
    try:
        value = spec.func(args, ctx)
        if not isinstance(value, spec.result_model):
            raise ToolFailure("tool_error", f"tool returned {type(value).__name__}")
        dumped = value.model_dump(mode="json")
        if contains_nul(dumped):
            raise ToolFailure("tool_error", "result contains NUL characters")
        body = canonical_json({"ok": True, "result": dumped})
        if len(body) > limits.output_bytes:
            raise ToolFailure(
                "too_large", f"result is {len(body)} bytes, cap {limits.output_bytes}"
            )
    except ToolFailure as e:
        body = canonical_json({"ok": False, "code": e.code, "message": e.message[:2000]})
    except MemoryError:
        body = canonical_json({"ok": False, "code": "tool_error", "message": "memory limit"})
    except CanonicalJSONError as e:
        body = canonical_json({"ok": False, "code": "tool_error", "message": f"result: {e}"})
    except Exception as e:  # the tool's own bug: report it, never crash the worker
        body = canonical_json(
            {"ok": False, "code": "tool_error", "message": f"{type(e).__name__}: {e}"[:2000]}
        )
    return body


class ForkExecutor:
    """Runs one tool call in a contained child process."""

    def __init__(
        self,
        *,
        scratch_root: Path | None = None,
        containment: str | None = None,
        layers: tuple[str, ...] = (),
    ) -> None:
        """``layers``: the kernel layers each call's process gets beyond its rlimits
        (``sandbox_tasks.confine``); a call whose layers cannot be applied fails unrun."""
        self.scratch_root = scratch_root
        self.layers = tuple(layers)
        self._trees: dict[tuple[Any, ...], tuple[Path, ...]] = {}
        if "seccomp" in self.layers:  # once here, not in each call's child
            with contextlib.suppress(OSError):  # if it fails, each call fails closed
                seccomp.load_library()
        if containment is None:
            containment = containment_name("fork", (*layers, "rlimits")) if layers else CONTAINMENT
        self.containment = containment

    def run(
        self,
        spec: ToolSpec,
        args: BaseModel,
        ctx: ToolContext,
        *,
        fetcher: Fetcher | None = None,
        tenant: str | None = None,
    ) -> Outcome:
        """Run one call; ``fetcher`` carries out its egress (default: here, and recorded).
        ``tenant`` is accepted for the worker's Executor protocol; a fork keeps no state."""
        fetches: list[dict[str, Any]] = []
        if fetcher is None:  # every tool may ask; only declared, policy-allowed hosts answer

            def fetcher(request: dict[str, Any]) -> dict[str, Any]:
                answer, record = egress.serve(
                    request, allowed=spec.egress, private=spec.private_egress
                )
                fetches.append(record)
                return answer

        outcome = self._run(spec, args, ctx, fetcher)
        return dataclasses.replace(outcome, fetches=tuple(fetches)) if fetches else outcome

    def _read_only(self, spec: ToolSpec, ctx: ToolContext) -> tuple[Path, ...]:
        """The trees a call of ``spec`` may read, computed once per tool and data roots
        (they are the installation's and the roots' paths, the same for every call)."""
        roots = tuple((name, str(ctx.roots.get(name))) for name in sorted(spec.data_roots))
        key = (spec.name, spec.func.__module__, roots, str(ctx.repo_root), str(ctx.docs_root))
        trees = self._trees.get(key)
        if trees is None:
            trees = self._trees[key] = read_only_trees(spec, ctx)
        return trees

    def _run(
        self, spec: ToolSpec, args: BaseModel, ctx: ToolContext, fetcher: Fetcher | None
    ) -> Outcome:
        cap = spec.limits.output_bytes + 4096
        trees = self._read_only(spec, ctx)
        state = ctx.state
        if spec.prepare is not None:
            try:  # in the process that forks: the child inherits what it prepared
                state = spec.prepare(ctx)
            except Exception as e:  # a tool's own bug: a failed call, never a dead worker
                return Outcome(False, None, "tool_error", f"prepare: {type(e).__name__}: {e}")
        with tempfile.TemporaryDirectory(prefix=f"tp-{spec.name}-", dir=self.scratch_root) as tmp:
            ctx = dataclasses.replace(ctx, scratch_dir=Path(tmp), state=state, fetch=None)
            outside, inside = socket.socketpair() if fetcher else (None, None)
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                os.close(read_fd)
                if outside is not None and inside is not None:
                    outside.close()
                    ctx = dataclasses.replace(ctx, fetch=child_fetch(inside))
                keep = (inside.fileno(),) if inside is not None else ()
                layers = self.layers
                _child(spec, args, ctx, write_fd, layers=layers, keep_fds=keep, read_only=trees)
            os.close(write_fd)
            if inside is not None:
                inside.close()
            try:
                data, timed_out, overflow = self._collect(
                    read_fd, spec.limits.timeout_s, cap, outside, fetcher
                )
            finally:
                os.close(read_fd)
                if outside is not None:
                    outside.close()
                _kill_group(pid)
                _, status = os.waitpid(pid, 0)
        if timed_out:
            return Outcome(False, None, "timeout", f"wall time limit of {spec.limits.timeout_s}s")
        if overflow:
            return Outcome(
                False, None, "too_large", f"output beyond {spec.limits.output_bytes} bytes"
            )
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU:
                return Outcome(False, None, "timeout", f"CPU time limit of {spec.limits.cpu_s}s")
            if sig == signal.SIGKILL:
                return Outcome(False, None, "tool_error", "killed (memory or hard CPU limit)")
            return Outcome(False, None, "tool_error", f"tool process killed by signal {sig}")
        try:
            outcome = parse_json_strict(data)
        except CanonicalJSONError as e:
            return Outcome(False, None, "tool_error", f"tool process sent no valid outcome ({e})")
        if not isinstance(outcome, dict):
            return Outcome(False, None, "tool_error", "tool process sent no valid outcome")
        if outcome.get("ok") is True and isinstance(outcome.get("result"), dict):
            return Outcome(True, outcome["result"])
        return Outcome(
            False, None, str(outcome.get("code", "tool_error")), str(outcome.get("message", ""))
        )

    @staticmethod
    def _collect(
        fd: int,
        timeout_s: float,
        cap: int,
        channel: socket.socket | None,
        fetcher: Fetcher | None,
    ) -> tuple[bytes, bool, bool]:
        deadline = time.monotonic() + timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"", True, False
            watched: list[Any] = [fd] if channel is None else [fd, channel]
            ready, _, _ = select.select(watched, [], [], remaining)
            if not ready:
                continue
            if channel is not None and channel in ready:
                request = recv_frame(channel)
                if not isinstance(request, dict) or fetcher is None:
                    channel = None  # the child closed it (or sent garbage): stop serving it
                else:
                    send_frame(channel, fetcher(request))
                if fd not in ready:
                    continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks), False, False
            size += len(chunk)
            if size > cap:
                return b"", False, True
            chunks.append(chunk)


def _kill_group(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
