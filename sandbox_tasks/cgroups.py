"""A process cap for a sandbox through the cgroup ``pids`` controller.

``RLIMIT_NPROC`` counts every process of the user and is ignored for root, so
it cannot bound a fork bomb here. A cgroup with ``pids.max`` can: every process
the sandbox starts joins it. cgroup v1 (``/sys/fs/cgroup/pids``) and v2 (a
delegated subtree with the pids controller) are both used where writable.

A worker that is not root cannot make cgroups of its own under the hierarchy's
root. On cgroup v1, ``toolplane up`` (as root) delegates one directory to each
worker user, ``/sys/fs/cgroup/pids/toolplane/uid-<uid>`` (``delegate``), and that
worker makes its sandboxes' cgroups inside it. On cgroup v2 a process may move
another only within a subtree whose ``cgroup.procs`` it can write at their common
ancestor, so a worker that was not started inside a delegated subtree has no pids
cgroup there; ``problem`` says why, and the per-call ``RLIMIT_NPROC`` (which binds
a worker user that is not root) is the cap that remains.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/pids")
V2_ROOT = Path("/sys/fs/cgroup")

__all__ = ["PidsCgroup", "create_pids_cgroup", "delegate", "delegated_dir", "problem"]


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


def delegated_dir(uid: int) -> Path:
    """The cgroup v1 directory ``toolplane up`` gives the worker user ``uid``."""
    return V1_ROOT / "toolplane" / f"uid-{uid}"


def delegate(uid: int, gid: int) -> Path | None:
    """As root: a cgroup v1 ``pids`` directory owned by ``uid``, where its sandboxes' cgroups
    go; None where the host has no writable v1 ``pids`` hierarchy (``problem`` says why)."""
    if not (V1_ROOT / "cgroup.procs").exists():
        return None
    path = delegated_dir(uid)
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, uid, gid)
    except OSError:
        return None
    return path


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


def _parents() -> list[Path]:
    if os.geteuid() != 0:  # only the directory delegated to this user (cgroup v1)
        own = delegated_dir(os.geteuid())
        return [own] if (own / "cgroup.procs").exists() and os.access(own, os.W_OK) else []
    parents = []
    if (V1_ROOT / "cgroup.procs").exists():
        parents.append(V1_ROOT / "toolplane")
    v2 = _v2_parent()
    if v2 is not None:
        parents.append(v2)
    return parents


def problem() -> str | None:
    """None if sandboxes get a pids cgroup here, else why not (for the worker's log)."""
    if _parents():
        return None
    if os.geteuid() == 0:
        return f"no writable cgroup pids controller ({V1_ROOT} or {V2_ROOT} with pids)"
    if (V1_ROOT / "cgroup.procs").exists():
        return (
            f"{delegated_dir(os.geteuid())} is missing or not writable by this user "
            "(`toolplane up` delegates it when it runs as root)"
        )
    return (
        "cgroup v2 (or no pids controller): a worker that is not root can move its sandboxes "
        "only inside a delegated subtree it was started in"
    )


def create_pids_cgroup(name: str, max_pids: int) -> PidsCgroup | None:
    """A fresh cgroup limited to ``max_pids`` processes, or None where none can be made."""
    for parent in _parents():
        try:
            parent.mkdir(exist_ok=True)
            path = parent / name
            path.mkdir(exist_ok=True)
            (path / "pids.max").write_text(str(max_pids))
            return PidsCgroup(path)
        except OSError:
            continue
    return None
