"""The kernel layers a tool's process runs under, which of them this host has, and how a
receipt names them.

Layers, in the order they are applied in the tool's own process (the per-call child):

- ``rlimits``: CPU time, address space, file size, open files, processes, no core dumps;
- ``no_new_privs``: nothing the tool executes gains privileges; the kernel requires it
  before the two below;
- ``landlockN``: Landlock at ABI N (``sandbox_tasks.confine.landlock``);
- ``seccomp``: the system call filter (``sandbox_tasks.confine.seccomp``).

None of them needs a namespace, so they hold in a container where bubblewrap cannot run,
and they apply under bubblewrap too. A layer that was asked for and cannot be applied
stops the call before the tool runs (ConfinementError): a call never runs with fewer
layers than its receipt names.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sandbox_tasks import prctl
from sandbox_tasks.confine import landlock, seccomp
from sandbox_tasks.errors import SandboxError
from toolplane.errors import SettingsError

__all__ = [
    "Confinement",
    "ConfinementError",
    "available",
    "confine",
    "containment",
    "missing",
    "trial",
    "worker_layers",
]

LAYER = re.compile(r"^(rlimits|no_new_privs|seccomp|landlock([1-9])?)$")
SHORT = {"no_new_privs": "nnp"}
ORDER = ("landlock", "seccomp", "no_new_privs", "rlimits")  # as a receipt names them


class ConfinementError(SandboxError):
    """A layer could not be applied; the call must not run."""

    def __init__(self, layer: str, message: str) -> None:
        super().__init__(f"{layer}: {message}")
        self.layer = layer


@dataclass(frozen=True)
class Confinement:
    """What one call's process may reach, and the layers that hold it there.

    ``read_only``: trees it may read and execute (system libraries, Python, the tool's
    code, its data root); ``read_write``: its scratch; ``rlimits``: resource → (soft, hard);
    ``layers``: the layers to apply (names as ``available`` gives them).
    """

    read_only: tuple[Path, ...] = ()
    read_write: tuple[Path, ...] = ()
    rlimits: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    layers: tuple[str, ...] = ()


def available() -> tuple[str, ...]:
    """The layers this host can apply to a process, e.g. ``("no_new_privs", "landlock7",
    "seccomp", "rlimits")``; Landlock with the highest ABI both kernel and code know."""
    found = ["no_new_privs"]
    version = min(landlock.abi(), landlock.MAX_ABI)
    if version:
        found.append(f"landlock{version}")
    if seccomp.available() is None:
        found.append("seccomp")
    found.append("rlimits")
    return tuple(found)


def missing(required: Iterable[str], have: Iterable[str]) -> list[str]:
    """The required layers that ``have`` does not satisfy (``landlockN``: ABI N or higher;
    ``landlock``: any ABI)."""
    have = list(have)
    abis = [int(n[8:]) for n in have if n.startswith("landlock") and n[8:].isdigit()]
    gaps = []
    for name in required:
        if name.startswith("landlock"):
            floor = int(name[8:] or 1)
            if not any(v >= floor for v in abis):
                gaps.append(name)
        elif name not in have:
            gaps.append(name)
    return gaps


def _kind(name: str) -> str:
    return "landlock" if name.startswith("landlock") else name


def containment(base: str, layers: Iterable[str]) -> str:
    """How a receipt names the containment: ``bwrap+landlock7+seccomp+nnp+rlimits``."""
    names = sorted(set(layers), key=lambda n: ORDER.index(_kind(n)))
    return "+".join([base, *(SHORT.get(n, n) for n in names)])


def confine(c: Confinement) -> tuple[str, ...]:
    """Apply every layer of ``c`` to the calling process, for good; the layers applied.

    Raises ConfinementError, naming the layer, if one cannot be applied: the caller must
    then not run the tool.
    """
    for name in c.layers:
        if not LAYER.match(name):
            raise ConfinementError(name, "no such layer")
    applied: list[str] = []
    if "rlimits" in c.layers:
        try:
            for which, (soft, hard) in c.rlimits.items():
                resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError) as e:
            raise ConfinementError("rlimits", str(e)) from e
        applied.append("rlimits")
    wanted = [n for n in c.layers if n.startswith("landlock") or n == "seccomp"]
    if "seccomp" in wanted:
        try:
            seccomp.load_library()  # while the file system is still open
        except OSError as e:
            raise ConfinementError("seccomp", str(e)) from e
    if "no_new_privs" in c.layers or wanted:  # the kernel requires it before those
        try:
            prctl.set_no_new_privs()
        except OSError as e:
            raise ConfinementError("no_new_privs", str(e)) from e
        if "no_new_privs" in c.layers:
            applied.append("no_new_privs")
    for name in wanted:
        if name == "seccomp":
            continue
        version = int(name[8:] or min(landlock.abi(), landlock.MAX_ABI) or 1)
        try:
            landlock.restrict(read_only=c.read_only, read_write=c.read_write, version=version)
        except OSError as e:
            raise ConfinementError(name, str(e)) from e
        applied.append(f"landlock{version}")
    if "seccomp" in c.layers:  # last: the filter would not stop Landlock, but keep it simple
        try:
            seccomp.install()
        except OSError as e:
            raise ConfinementError("seccomp", str(e)) from e
        applied.append("seccomp")
    return tuple(applied)


def trial(c: Confinement) -> str | None:
    """Apply ``c`` in a throwaway child: None if every layer held, else the error."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 0
        try:
            os.close(read_fd)
            confine(c)
        except BaseException as e:  # noqa: BLE001 - report anything, never return
            os.write(write_fd, str(e).encode()[:2000] or b"failed")
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        message = b""
        while chunk := os.read(read_fd, 4096):
            message += chunk
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return None
    return message.decode(errors="replace") or f"the trial child ended with status {status}"


def worker_layers(
    required: Iterable[str], *, read_only: Iterable[Path], forbidden: Iterable[Path]
) -> tuple[str, ...]:
    """The layers a worker applies to every call (all this host has, beyond rlimits, which
    the executor always sets), once a trial process showed they hold; SettingsError naming
    TOOLPLANE_SANDBOX_MIN_LAYERS if the host has fewer than ``required``, and naming
    TOOLPLANE_HOME if a ``forbidden`` path (keys) lies in a tree a call may read."""
    have = available()
    gaps = missing(required, have)
    if gaps:
        raise SettingsError(
            f"this host cannot apply {', '.join(gaps)} to a tool's process (it has "
            f"{', '.join(have)}); lower TOOLPLANE_SANDBOX_MIN_LAYERS only if the worker's "
            "other containment makes up for it",
            setting="SANDBOX_MIN_LAYERS",
        )
    read_only = [Path(p).resolve() for p in read_only]
    for secret in forbidden:
        for tree in read_only:
            if Path(secret).resolve().is_relative_to(tree):
                raise SettingsError(
                    f"{secret} would be readable by the tools through {tree}",
                    setting="HOME",
                )
    layers = tuple(n for n in have if n != "rlimits")
    problem = trial(Confinement(layers=layers))
    if problem is not None:
        raise SettingsError(
            f"a trial process could not apply {', '.join(layers)}: {problem}",
            setting="SANDBOX_MIN_LAYERS",
        )
    return layers
