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

The same cgroup is how a sandbox is swept: its ``cgroup.procs`` lists every process
of the sandbox, whatever session or process group it moved to, so the worker can
tell whether anything outlived a call and kill all of it (``kill_all``). Where the
v1 ``freezer`` controller (delegated like ``pids``), or v2's ``cgroup.kill`` and
``cgroup.freeze``, is there too, the processes are frozen first so that none forks
while they are killed; without it ``pids.max`` is lowered to 0 first, which stops
forks as well. A sandbox's cgroup is named ``<tool>-<worker pid>-...``: those of a
worker process that died are swept when the tool's executor is next built
(``remove_stale``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox_tasks.errors import CgroupError

V1_ROOT = Path("/sys/fs/cgroup/pids")
V1_FREEZER = Path("/sys/fs/cgroup/freezer")
V2_ROOT = Path("/sys/fs/cgroup")
KILL_TIMEOUT_S = 5.0

__all__ = [
    "CgroupError",
    "PidsCgroup",
    "create_pids_cgroup",
    "delegate",
    "delegated_dir",
    "problem",
    "remove_stale",
]


@dataclass(frozen=True)
class PidsCgroup:
    """One sandbox's cgroup: ``path`` in the pids hierarchy, ``freezer`` (v1) if there is one."""

    path: Path
    freezer: Path | None = None

    def join(self) -> None:
        """Move the calling process in (call it in the child before exec)."""
        for where in (self.path, self.freezer):
            if where is not None:
                with open(where / "cgroup.procs", "w") as handle:
                    handle.write(str(os.getpid()))

    def procs(self) -> set[int]:
        """Every process in the sandbox now, in its cgroup or any cgroup made beneath it
        (a process that can write its own cgroup's directory can make one and move there);
        an OSError if the cgroup cannot be read."""
        found: set[int] = set()
        for where in _tree(self.path):
            try:
                text = (where / "cgroup.procs").read_text()
            except FileNotFoundError:  # removed while walking
                if where == self.path:
                    raise
                continue
            found.update(int(line) for line in text.split())
        return found

    def nested(self) -> list[Path]:
        """The cgroups made beneath the sandbox's (by a process of the sandbox)."""
        return [p for root in (self.path, self.freezer) if root for p in _tree(root)[1:]]

    def kill_all(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """Freeze (or stop forks), SIGKILL every process, and wait until none is left."""
        if (self.path / "cgroup.kill").exists():  # cgroup v2, Linux 5.14+
            (self.path / "cgroup.kill").write_text("1")
        frozen = self._freeze(True)
        if not frozen:
            with contextlib.suppress(OSError):
                (self.path / "pids.max").write_text("0")  # no new process from here on
        deadline = time.monotonic() + timeout
        try:
            while pids := self.procs():
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                if frozen:  # a frozen process dies only once thawed
                    self._freeze(False)
                    frozen = False
                if time.monotonic() > deadline:
                    raise CgroupError(
                        f"{len(pids)} process(es) of {self.path} would not die",
                        path=str(self.path),
                    )
                time.sleep(0.002)
        finally:
            if frozen:
                self._freeze(False)

    def _freeze(self, on: bool) -> bool:
        """Freeze (or thaw) the sandbox; False where this cgroup has no freezer."""
        try:
            if self.freezer is not None:
                (self.freezer / "freezer.state").write_text("FROZEN" if on else "THAWED")
                deadline = time.monotonic() + 1.0
                while on and (self.freezer / "freezer.state").read_text().strip() != "FROZEN":
                    if time.monotonic() > deadline:
                        return True  # FREEZING: killing still works once thawed
                    time.sleep(0.001)
                return True
            if (self.path / "cgroup.freeze").exists():  # cgroup v2
                (self.path / "cgroup.freeze").write_text("1" if on else "0")
                return True
        except OSError:
            return False
        return False

    def remove(self) -> None:
        for root in (self.path, self.freezer):
            if root is not None:
                for where in reversed(_tree(root)):  # the deepest first
                    with contextlib.suppress(OSError):
                        where.rmdir()


def _tree(root: Path) -> list[Path]:
    """``root`` and every cgroup beneath it, parents before their children."""
    found = [root]
    for top, dirs, _ in os.walk(root):
        found += [Path(top) / d for d in sorted(dirs)]
    return found


def delegated_dir(uid: int, root: Path | None = None) -> Path:
    """The cgroup v1 directory ``toolplane up`` gives the worker user ``uid`` (in the pids
    hierarchy, or in ``root``, e.g. the freezer's)."""
    return (root or V1_ROOT) / "toolplane" / f"uid-{uid}"


def delegate(uid: int, gid: int) -> Path | None:
    """As root: a cgroup v1 ``pids`` directory owned by ``uid``, where its sandboxes' cgroups
    go (and one in the ``freezer`` hierarchy, where mounted); None where the host has no
    writable v1 ``pids`` hierarchy (``problem`` says why)."""
    if not (V1_ROOT / "cgroup.procs").exists():
        return None
    path = delegated_dir(uid)
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, uid, gid)
    except OSError:
        return None
    if (V1_FREEZER / "cgroup.procs").exists():
        freezer = delegated_dir(uid, V1_FREEZER)
        with contextlib.suppress(OSError):
            freezer.mkdir(parents=True, exist_ok=True)
            os.chown(freezer, uid, gid)
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


def _freezer_parent() -> Path | None:
    if not (V1_FREEZER / "cgroup.procs").exists():
        return None
    if os.geteuid() != 0:
        own = delegated_dir(os.geteuid(), V1_FREEZER)
        return own if (own / "cgroup.procs").exists() and os.access(own, os.W_OK) else None
    return V1_FREEZER / "toolplane"


def create_pids_cgroup(name: str, max_pids: int) -> PidsCgroup | None:
    """A fresh cgroup limited to ``max_pids`` processes, or None where none can be made;
    with a v1 freezer cgroup of the same name where one can be made."""
    for parent in _parents():
        try:
            parent.mkdir(exist_ok=True)
            path = parent / name
            path.mkdir(exist_ok=True)
            (path / "pids.max").write_text(str(max_pids))
        except OSError:
            continue
        freezer = None
        if parent.is_relative_to(V1_ROOT) and (frozen := _freezer_parent()) is not None:
            try:
                frozen.mkdir(exist_ok=True)
                (frozen / name).mkdir(exist_ok=True)
                freezer = frozen / name
            except OSError:
                freezer = None
        return PidsCgroup(path, freezer)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(tool: str) -> int:
    """Sandbox cgroups of ``tool`` left by worker processes that died (a sandbox's cgroup
    is named ``<tool>-<worker pid>-...``): whatever is still in one is killed, and it is
    removed. Returns how many were removed."""
    pattern = re.compile(rf"^{re.escape(tool)}-(\d+)-")
    freezer = _freezer_parent()
    removed = 0
    for parent in _parents():
        try:
            entries = [p for p in parent.iterdir() if p.is_dir()]
        except OSError:
            continue
        for path in entries:
            found = pattern.match(path.name)
            if found is None or _alive(int(found.group(1))):
                continue
            twin = freezer / path.name if freezer is not None else None
            group = PidsCgroup(path, twin if twin is not None and twin.is_dir() else None)
            try:
                group.kill_all()
            except OSError:
                continue
            group.remove()
            removed += not path.exists()
    return removed
