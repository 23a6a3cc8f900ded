"""The executor where no namespaces can be made: the same runners, as plain processes.

Used only where the operator allows it (``TOOLPLANE_ALLOW_WEAK_CONTAINMENT``), e.g. in a
container whose profile forbids user namespaces. A tool never runs in a fork of the
worker: each runner is a freshly executed ``python -I`` process (closed descriptors, an
empty environment, not dumpable, its own session and cgroup), so the worker's memory (the
receipt key, the broker connection) is never in the tool's process, and a call cannot
open the runner's channel or the worker's ``/proc`` entries. The pool, the per-tenant
runners and the checks after each call are those of ``sandbox_tasks.runners``.

What namespaces would add is missing here: the network, the file system and other
processes of the worker's user are as the worker sees them. The receipts say
``runner (no namespaces)``, followed by any further layer in force.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sandbox_tasks import containment
from sandbox_tasks.registry import ToolSpec
from sandbox_tasks.runners import DEFAULT_WARM_RUNNERS, EXTRA_PIDS, RunnerExecutor
from sandbox_tasks.sandbox import Sandbox

__all__ = ["PlainExecutor"]


class PlainExecutor(RunnerExecutor):
    """Runs one tool's calls in per-tenant warm runners, each a fresh process of its own.

    Each runner's scratch root (its working directory, the parent of its calls' scratch
    directories) is a new directory under ``scratch_root``, removed with the runner."""

    base = containment.NO_NAMESPACES

    def __init__(
        self,
        *,
        spec: ToolSpec,
        roots: dict[str, Path],
        extra_modules: list[str],
        scratch_root: Path,
        max_runners: int = DEFAULT_WARM_RUNNERS,
        layers: tuple[str, ...] = (),
        fresh: bool = False,
    ) -> None:
        super().__init__(
            spec=spec,
            roots=roots,
            extra_modules=extra_modules,
            max_runners=max_runners,
            layers=layers,
            fresh=fresh,
        )
        self.scratch_root = scratch_root

    def argv(self, scratch: Path) -> list[str]:
        return self.runner_command(scratch)

    def _launch(self, name: str) -> Sandbox:
        scratch = self.scratch_root / f"runner-{name}"
        scratch.mkdir(mode=0o700, parents=True)
        try:
            return Sandbox(
                argv=self.argv(scratch),
                name=name,
                tool=self.spec.name,
                max_pids=self.spec.limits.processes + EXTRA_PIDS,
                cwd=scratch,
                scratch=scratch,
            )
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
