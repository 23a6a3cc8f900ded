"""One started runner: its process tree, its channel, its cgroup, and whether it is clean.

A :class:`Sandbox` starts the runner's command line (bwrap's, or the runner's own) as a
fresh process with an empty environment and no inherited descriptors but its channel (a
socket, which ``/proc/<pid>/fd`` cannot reopen), in a cgroup of its own where the host
gives one. Once the runner says it is ready, the processes in that cgroup are the
sandbox's *baseline* (bwrap's monitor and the runner, or the runner alone).

``problem()`` says why the sandbox must not serve another call, or None: the runner
exited or is stopped or traced (``/proc/<pid>/stat`` state), a process beyond the baseline
is in the cgroup (something outlived its call, wherever it moved its session or process
group), a process of the baseline is gone, or the runner's own report after the call
(orphans still alive, files changed in its scratch root). ``destroy()`` kills every
process of the sandbox through its cgroup (frozen first where a freezer is mounted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox_tasks import frames
from sandbox_tasks.cgroups import PidsCgroup, create_pids_cgroup
from sandbox_tasks.errors import CgroupError

log = logging.getLogger("toolplane.sandbox")

START_TIMEOUT_S = 20.0
MAX_STDERR_LINE = 2000
BAD_STATES = frozenset("TtZXx")  # stopped, traced, zombie, dead

__all__ = ["Sandbox", "process_state"]


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``/proc/<pid>/stat``), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _ns_pid(pid: int) -> int | None:
    """``pid`` as its innermost PID namespace numbers it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


class Sandbox:
    """A runner started from ``argv``; ``scratch`` (if given) is removed with it."""

    def __init__(
        self,
        *,
        argv: list[str],
        name: str,
        tool: str,
        max_pids: int,
        cwd: Path | None = None,
        scratch: Path | None = None,
    ) -> None:
        self.name, self.tool, self.scratch = name, tool, scratch
        self.cgroup: PidsCgroup | None = create_pids_cgroup(name, max_pids)
        outside, inside = socket.socketpair()
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - a fixed argv of ours
                argv,
                stdin=inside,
                stdout=inside,
                stderr=subprocess.PIPE,  # relayed to the worker's log, line by line
                close_fds=True,
                env={},
                cwd=cwd,
                start_new_session=True,
                preexec_fn=self.cgroup.join if self.cgroup is not None else None,  # noqa: PLW1509
            )
        except BaseException:
            outside.close()
            if self.cgroup is not None:
                self.cgroup.remove()
            raise
        finally:
            inside.close()
        assert self.proc.stderr is not None
        threading.Thread(
            target=_relay, args=(self.proc.stderr, tool), name=f"stderr-{name}", daemon=True
        ).start()
        self.channel = outside
        self.runner_pid = self.proc.pid
        self.baseline: set[int] = {self.proc.pid}
        try:
            ready = self._read(time.monotonic() + START_TIMEOUT_S)
            if not isinstance(ready, dict) or ready.get("ready") != tool:
                raise OSError(f"sandbox runner for {tool} did not start ({ready!r})")
            if ready.get("dumpable") is not False:
                raise OSError(f"sandbox runner for {tool} is dumpable")
            self.baseline = self.cgroup.procs() if self.cgroup else self._tree()
            self.runner_pid = self._find_runner(int(ready.get("pid", -1)))
        except BaseException:
            self.destroy()
            raise

    # -- who is who --------------------------------------------------------------------
    def _tree(self) -> set[int]:
        return {self.proc.pid, *_children(self.proc.pid)}

    def _find_runner(self, ns_pid: int) -> int:
        """The runner's own pid here (under bwrap it is PID 1 of its namespace)."""
        found = [p for p in self.baseline if p != self.proc.pid and _ns_pid(p) == ns_pid]
        return found[0] if len(found) == 1 else self.proc.pid

    # -- the channel -------------------------------------------------------------------
    def _read_exact(self, size: int, deadline: float) -> bytes:
        chunks, got = [], 0
        while got < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.channel], [], [], remaining)
            if not ready:
                raise TimeoutError
            chunk = self.channel.recv(min(size - got, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _read(self, deadline: float) -> Any:
        try:
            size = frames.body_size(self._read_exact(frames.HEADER, deadline))
        except frames.FrameError as e:
            raise EOFError from e
        return frames.decode(self._read_exact(size, deadline))

    def call(
        self,
        request: dict[str, Any],
        deadline: float,
        serve_fetch: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Any:
        """Send one call and return the runner's answer, serving its fetches on the way.
        Raises TimeoutError, EOFError, OSError or CanonicalJSONError."""
        self.channel.sendall(frames.encode(request))
        reply = self._read(deadline)
        while isinstance(reply, dict) and isinstance(reply.get("fetch"), dict):
            self.channel.sendall(frames.encode(serve_fetch(reply["fetch"])))
            reply = self._read(deadline)
        return reply

    # -- clean or not ------------------------------------------------------------------
    def problem(self, reply: Any = None) -> str | None:
        """Why this sandbox must not serve another call, or None."""
        if self.proc.poll() is not None:
            return f"runner exited ({self.proc.returncode})"
        for pid in {self.runner_pid, self.proc.pid}:
            state = process_state(pid)
            if state is None or state in BAD_STATES:
                return f"process {pid} is {'gone' if state is None else 'in state ' + state}"
        if self.cgroup is not None:
            try:
                now = self.cgroup.procs()
            except OSError as e:
                return f"cgroup unreadable: {e}"
            if now - self.baseline:
                return f"{len(now - self.baseline)} process(es) outlived the call"
            if self.baseline - now:
                return "a process of the runner is gone"
            if self.cgroup.nested():
                return "the call made a cgroup beneath the sandbox's"
        if isinstance(reply, dict):
            if reply.get("orphans"):
                return "the call left processes behind"
            if reply.get("left"):
                return f"the call left files: {', '.join(map(str, reply['left']))[:300]}"
        return None

    def destroy(self) -> None:
        """Kill every process of the sandbox and remove its cgroup and scratch."""
        if self.cgroup is not None:
            try:
                self.cgroup.kill_all()
            except (CgroupError, OSError) as e:
                log.error("sandbox.kill_failed name=%s error=%s", self.name, e)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        self.channel.close()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _relay(stream: Any, tool: str) -> None:
    """What a runner (or bwrap) writes on stderr, as the worker's log lines (in its format,
    JSON too), each cut at MAX_STDERR_LINE bytes."""
    with stream:
        for raw in stream:
            text = raw[:MAX_STDERR_LINE].decode(errors="replace").rstrip()
            if text:
                log.warning("sandbox.stderr tool=%s line=%s", tool, text)
