"""The trees one call's process may see: the same view bubblewrap gives the runner.

Read-only: the system's libraries and programs, a few files under ``/etc`` that the C
library and Python read (never all of ``/etc``), ``/dev/null`` and the random devices,
the Python installation (``sys.prefix`` and ``sys.base_prefix``), the packages that
define the tool, and the tool's own data root. Read-write: the call's scratch directory.
Nothing else: not ``/proc`` (no other process's ``environ``, ``mem`` or ``fd``; Python
needs none of it once running), not the worker's home or keys, not ``/tmp``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

from sandbox_tasks.errors import ToolFailure
from sandbox_tasks.registry import ToolContext, ToolSpec

__all__ = ["SYSTEM_DIRS", "SYSTEM_FILES", "code_dirs", "read_only_trees"]

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/alternatives")
SYSTEM_FILES = (
    "/etc/ld.so.cache",  # the dynamic loader, for whatever the tool executes
    "/etc/localtime",
    "/etc/passwd",  # getpass, pwd: names only, no secrets
    "/etc/group",
    "/etc/nsswitch.conf",
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
)


def package_dir(module: str) -> Path:
    """The top-level package directory (or module file) that ``module`` lives in."""
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find module {top!r}")
    origin = Path(spec.origin).resolve()
    return origin.parent if origin.name == "__init__.py" else origin


def code_dirs(spec: ToolSpec, extra_modules: Iterable[str] = ()) -> set[Path]:
    modules = ("sandbox_tasks", "toolplane", *extra_modules, spec.func.__module__)
    return {package_dir(m) for m in modules}


def read_only_trees(spec: ToolSpec, ctx: ToolContext) -> tuple[Path, ...]:
    """What the call may read (and execute), as absolute paths that exist here."""
    trees = {Path(p) for p in (*SYSTEM_DIRS, *SYSTEM_FILES)}
    trees |= {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    trees |= code_dirs(spec)
    for name in spec.data_roots:  # the tool's own data roots, and no other
        try:
            trees.add(Path(ctx.root(name)).resolve())
        except ToolFailure:  # not given to this call: the tool will be refused it anyway
            continue
    return tuple(sorted(p for p in trees if p.exists()))
