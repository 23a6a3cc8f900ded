"""What the embedded servers share: locating a package's shipped binaries, and the
life of a detached process (is it alive, stop it, the end of its log)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from pathlib import Path

import psutil

__all__ = ["EmbeddedError"]


class EmbeddedError(Exception):
    """An embedded server could not be started or stopped."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _alive(pid: int | None, name: str, marker: str = "") -> bool:
    """pid runs a live (non-zombie) ``name`` process whose command line contains ``marker``."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if name not in proc.name():
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
            return False
        return not marker or any(marker in part for part in proc.cmdline())
    except psutil.Error:
        return False


def _escalate(pid: int, name: str, timeout: float, signals: tuple[int, ...]) -> bool:
    """Wait ``timeout`` for pid to exit, then send each signal in turn (5 s apart)."""
    for sig in (None, *signals):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (timeout if sig is None else 5.0)
        while _alive(pid, name):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return True
    return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text) or "(empty log)"
