"""Warm runners, one per tenant, each provably clean before it serves another call.

A :class:`RunnerExecutor` keeps, in each worker process, at most ``max_runners`` warm
runners (least recently used first out), one per tenant: a call never runs in a runner
that a call of another tenant could have touched. Before and after each call the
runner's sandbox is checked (``Sandbox.problem``): a runner that exited, is stopped or
traced, has a process beyond its own in its cgroup, or reports orphans or changed files
in its scratch root is killed with everything in its cgroup and replaced. Where the host
gives no cgroup, nothing proves that a call left no process behind, so every call gets a
fresh runner (logged once per worker process as ``sandbox.fresh_per_call``).

Subclasses say how a runner starts: ``BwrapExecutor`` (namespaces) and ``PlainExecutor``
(no namespaces). ``containment``, signed into every receipt, is built in one place
(``sandbox_tasks.containment``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sandbox_tasks import cgroups, containment, egress, frames
from sandbox_tasks.confine.trees import code_dirs
from sandbox_tasks.executor import Outcome
from sandbox_tasks.registry import ToolContext, ToolSpec
from sandbox_tasks.runner import runner_argv
from sandbox_tasks.sandbox import Sandbox
from toolplane.canonical import CanonicalJSONError

log = logging.getLogger("toolplane.sandbox")

DEFAULT_WARM_RUNNERS = 4
EXTRA_PIDS = 4  # the runner, bwrap's monitor, and room to spare beyond the tool's own cap

__all__ = ["DEFAULT_WARM_RUNNERS", "RunnerExecutor"]


class RunnerExecutor(ABC):
    """Runs one tool's calls in per-tenant warm runners; subclasses start the runners."""

    base = "runner"

    def __init__(
        self,
        *,
        spec: ToolSpec,
        roots: dict[str, Path],
        extra_modules: list[str],
        max_runners: int = DEFAULT_WARM_RUNNERS,
        layers: tuple[str, ...] = (),
        fresh: bool = False,
    ) -> None:
        if max_runners < 1:
            raise ValueError("max_runners must be at least 1")
        self.spec = spec
        self.roots = {name: path.resolve() for name, path in roots.items()}  # the tool's only
        self.extra_modules = list(extra_modules)
        self.max_runners = max_runners
        self.layers = tuple(layers)
        self.fresh = fresh  # a fresh runner for every call, as where there is no cgroup
        self.code_dirs = sorted(code_dirs(spec, extra_modules))
        self._runners: OrderedDict[str, Sandbox] = OrderedDict()
        self._owner = os.getpid()
        self._serial = 0
        self._said_fresh = False
        self.replaced = 0  # runners replaced because they were not clean (for tests, bench)
        if stale := cgroups.remove_stale(spec.name):
            log.warning("sandbox.stale_cgroups tool=%s removed=%d", spec.name, stale)

    @property
    def containment(self) -> str:
        return containment.describe(self.base, self.layers)

    @property
    def code_paths(self) -> list[str]:
        """What goes on the runner's ``sys.path``: the directories holding the code."""
        return sorted({str(d.parent) for d in self.code_dirs})

    def runner_command(self, scratch_root: Path) -> list[str]:
        """The runner's own command line (inside whatever wraps it), for this tool."""
        return runner_argv(
            python=sys.executable,
            code_paths=self.code_paths,
            tool=self.spec.name,
            roots=self.roots,
            extra_modules=self.extra_modules,
            scratch_root=scratch_root,
            layers=self.layers,
        )

    # -- subclasses ----------------------------------------------------------------------
    @abstractmethod
    def _launch(self, name: str) -> Sandbox:
        """Start a runner: under bubblewrap (``bwrap``) or as a plain process (``plain``)."""

    # -- the pool ------------------------------------------------------------------------
    def _name(self) -> str:
        self._serial += 1
        return f"{self.spec.name}-{os.getpid()}-{self._serial}-{time.monotonic_ns() % 10**6}"

    def _take(self, tenant: str) -> Sandbox:
        if self._owner != os.getpid():  # inherited through fork: the parent's to stop
            self._runners = OrderedDict()
            self._owner = os.getpid()
        sandbox = self._runners.pop(tenant, None)
        if sandbox is not None:
            why = sandbox.problem()
            if why is None:
                self._runners[tenant] = sandbox
                return sandbox
            self._retire(tenant, sandbox, why, before=True)
        while len(self._runners) >= self.max_runners:
            old_tenant, old = self._runners.popitem(last=False)
            log.info("sandbox.evicted tool=%s tenant=%s", self.spec.name, old_tenant)
            old.destroy()
        sandbox = self._launch(self._name())
        if sandbox.cgroup is None and not self._said_fresh:
            self._said_fresh = True
            log.warning(
                "sandbox.fresh_per_call tool=%s: no cgroup for the sandbox here, so nothing "
                "proves a call left no process behind: every call gets a fresh runner",
                self.spec.name,
            )
        log.info(
            "sandbox.started tool=%s tenant=%s runner=%s cgroup=%s",
            self.spec.name,
            tenant,
            sandbox.runner_pid,
            sandbox.cgroup and sandbox.cgroup.path,
        )
        self._runners[tenant] = sandbox
        return sandbox

    def _retire(self, tenant: str, sandbox: Sandbox, why: str, *, before: bool = False) -> None:
        self._runners.pop(tenant, None)
        self.replaced += 1
        log.warning(
            "sandbox.replaced tool=%s tenant=%s when=%s reason=%s",
            self.spec.name,
            tenant,
            "before" if before else "after",
            why,
        )
        sandbox.destroy()

    def _drop(self, tenant: str, sandbox: Sandbox, why: str | None = None) -> None:
        self._runners.pop(tenant, None)
        if why is not None:
            log.warning("sandbox.killed tool=%s tenant=%s reason=%s", self.spec.name, tenant, why)
        sandbox.destroy()

    # -- a call --------------------------------------------------------------------------
    def run(
        self, spec: ToolSpec, args: BaseModel, ctx: ToolContext, *, tenant: str | None = None
    ) -> Outcome:
        key = tenant or ""
        sandbox = self._take(key)
        request = {
            "args": args.model_dump(mode="json"),
            "limits": spec.limits.as_dict(),  # as policy lowered them for this call
        }
        fetches: list[dict[str, Any]] = []

        def serve(fetch: dict[str, Any]) -> dict[str, Any]:
            answer, record = egress.serve(fetch, allowed=spec.egress, private=spec.private_egress)
            fetches.append(record)
            return answer

        deadline = time.monotonic() + spec.limits.timeout_s + 1.0
        try:
            reply = sandbox.call(request, deadline, serve)
        except TimeoutError:
            self._drop(key, sandbox, "wall time")
            return Outcome(False, None, "timeout", f"wall time limit of {spec.limits.timeout_s}s")
        except (EOFError, CanonicalJSONError, frames.FrameError, OSError) as e:
            self._drop(key, sandbox, f"channel: {type(e).__name__}")
            return Outcome(False, None, "tool_error", f"sandbox runner failed: {type(e).__name__}")
        why = sandbox.problem(reply)
        if why is not None:
            self._retire(key, sandbox, why)
        elif sandbox.cgroup is None or self.fresh:
            self._drop(key, sandbox)
        if not isinstance(reply, dict):
            return Outcome(False, None, "tool_error", "sandbox runner sent no valid outcome")
        if reply.get("ok") is True and isinstance(reply.get("result"), dict):
            return Outcome(True, reply["result"], fetches=tuple(fetches))
        code, message = str(reply.get("code") or "tool_error"), str(reply.get("message") or "")
        return Outcome(False, None, code, message, fetches=tuple(fetches))

    def close(self) -> None:
        if self._owner != os.getpid():
            self._runners = OrderedDict()
            return
        while self._runners:
            _, sandbox = self._runners.popitem()
            sandbox.destroy()
