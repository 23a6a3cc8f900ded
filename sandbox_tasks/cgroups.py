"""A process cap for a sandbox through the cgroup ``pids`` controller.

``RLIMIT_NPROC`` counts every process of the user and is ignored for root, so
it cannot bound a fork bomb here. A cgroup with ``pids.max`` can: every process
the sandbox starts joins it. cgroup v1 (``/sys/fs/cgroup/pids``) and v2 (a
delegated subtree with the pids controller) are both used where writable.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/pids")
V2_ROOT = Path("/sys/fs/cgroup")

__all__ = ["PidsCgroup", "create_pids_cgroup"]


@dataclass(frozen=True)
class PidsCgroup:
    path: Path

    def join(self) -> None:
        """Move the calling process in (call it in the child before exec)."""
        with open(self.path / "cgroup.procs", "w") as handle:
            handle.write(str(os.getpid()))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _v2_parent() -> Path | None:
    try:
        if "pids" not in (V2_ROOT / "cgroup.controllers").read_text().split():
            return None
        parent = V2_ROOT / "toolplane"
        parent.mkdir(exist_ok=True)
        subtree = (parent / "cgroup.subtree_control").read_text().split()
        if "pids" not in subtree:
            (parent / "cgroup.subtree_control").write_text("+pids")
        return parent
    except OSError:
        return None


def create_pids_cgroup(name: str, max_pids: int) -> PidsCgroup | None:
    """A fresh cgroup limited to ``max_pids`` processes, or None where none can be made."""
    parents = []
    if (V1_ROOT / "cgroup.procs").exists():
        parents.append(V1_ROOT / "toolplane")
    v2 = _v2_parent()
    if v2 is not None:
        parents.append(v2)
    for parent in parents:
        try:
            parent.mkdir(exist_ok=True)
            path = parent / name
            path.mkdir(exist_ok=True)
            (path / "pids.max").write_text(str(max_pids))
            return PidsCgroup(path)
        except OSError:
            continue
    return None
