"""The tool registry: what a tool is, and how plugins are found.

A tool is a name, a strict pydantic args model, a result model, a function,
its limits and its egress allowlist. Tools are found through the entry-point
group ``toolplane.tools`` (each entry point names a ``ToolSpec``) and through the
modules listed in ``TOOLPLANE_EXTRA_TOOLS`` (each module exposes ``TOOLS``, a list
of ``ToolSpec``, or ``TOOL``, one ``ToolSpec``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sandbox_tasks.errors import RegistryError, ToolFailure

ENTRY_POINT_GROUP = "toolplane.tools"
TOOL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
ROOT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

__all__ = ["Limits", "ToolContext", "ToolSpec", "constrained", "load_tools", "ENTRY_POINT_GROUP"]


@dataclass(frozen=True)
class Limits:
    """Resource limits of one call of a tool, enforced by the executor."""

    timeout_s: float = 10.0  # wall time
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 512  # RLIMIT_AS
    output_bytes: int = 1_000_000  # cap on the canonical JSON of the result
    file_bytes: int = 8_000_000  # RLIMIT_FSIZE: largest file the tool may write
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # the sandbox's process cap (cgroup pids.max; RLIMIT_NPROC too)

    def as_dict(self) -> dict[str, Any]:
        return {
            "timeout_s": self.timeout_s,
            "cpu_s": self.cpu_s,
            "memory_mb": self.memory_mb,
            "output_bytes": self.output_bytes,
            "file_bytes": self.file_bytes,
            "open_files": self.open_files,
            "processes": self.processes,
        }


@dataclass(frozen=True)
class ToolContext:
    """What a tool function may see of its host.

    ``roots`` maps the data roots the tool declares to their directories (read-only
    in the sandbox); ``ctx.root(name)`` gives one. ``repo_root`` and ``docs_root`` are
    the ``repo`` and ``docs`` entries, kept for the tools written before named roots.
    """

    scratch_dir: Path
    repo_root: Path | None = None
    docs_root: Path | None = None
    state: Any = None  # what the tool's ``prepare`` returned
    fetch: Any = None  # ctx.fetch(url, max_bytes=...) for tools that declare egress
    roots: Mapping[str, Path] = field(default_factory=dict)

    def root(self, name: str) -> Path:
        """The directory of the data root ``name``; refused unless the tool has it."""
        found = self.roots.get(name)
        if found is None:
            found = {"repo": self.repo_root, "docs": self.docs_root}.get(name)
        if found is None:
            raise ToolFailure("tool_error", f"the data root {name!r} is not given to this tool")
        return found


@dataclass(frozen=True)
class ToolSpec:
    """A tool: called as ``func(args, ctx)`` and returns an instance of ``result_model``.

    ``func`` raises ``sandbox_tasks.errors.ToolFailure(code, message)`` for a refusal
    with a contract error code. ``prepare``, if given, runs in the worker before a
    call (it should be cheap when nothing changed) and its value is ``ctx.state``.
    """

    name: str
    version: str
    description: str
    args_model: type[BaseModel]
    result_model: type[BaseModel]
    func: Callable[[Any, ToolContext], BaseModel]
    limits: Limits = field(default_factory=Limits)
    egress: tuple[str, ...] = ()
    read_only: bool = False  # True: running it twice is harmless, so a lost attempt is retried
    max_attempts: int = 3  # attempts of a read-only tool's call when one is lost
    data_root: str | None = None  # one named data root (kept: data_roots says it better)
    prepare: Callable[[ToolContext], Any] | None = None
    data_roots: tuple[str, ...] = ()  # the named directories it reads, mounted read-only
    follow_symlinks: bool = False  # True: it opens paths through symlinks inside its roots
    private_egress: tuple[str, ...] = ()  # granted per call by policy (never declared)

    def __post_init__(self) -> None:
        if not TOOL_NAME.match(self.name):
            raise RegistryError(
                f"tool name {self.name!r} must match {TOOL_NAME.pattern}", tool=self.name
            )
        if not 1 <= self.max_attempts <= 10:
            raise RegistryError("max_attempts must be 1 to 10", tool=self.name)
        roots = tuple(dict.fromkeys((*self.data_roots, *filter(None, [self.data_root]))))
        for root in roots:
            if not isinstance(root, str) or not ROOT_NAME.match(root):
                raise RegistryError(
                    f"data root name {root!r} must match {ROOT_NAME.pattern}", tool=self.name
                )
        object.__setattr__(self, "data_roots", roots)
        config = self.args_model.model_config
        if config.get("extra") != "forbid" or not config.get("strict"):
            raise RegistryError("args model must be strict with extra='forbid'", tool=self.name)

    def manifest(self) -> dict[str, Any]:
        """What a worker announces of this tool (signed with the tool's key)."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "args_schema": self.args_model.model_json_schema(),
            "result_schema": self.result_model.model_json_schema(),
            "limits": self.limits.as_dict(),
            "egress": list(self.egress),
            "read_only": self.read_only,
            "max_attempts": self.max_attempts if self.read_only else 1,
            "data_roots": list(self.data_roots),
            "follow_symlinks": self.follow_symlinks,
        }


def constrained(
    spec: ToolSpec,
    limits: dict[str, int | float] | None,
    egress: list[str] | None,
    private_egress: list[str] | None = None,
) -> ToolSpec:
    """The tool as policy lets this call run it: limits only lower, hosts only fewer, and
    the hosts (among those) that policy lets resolve to non-public addresses."""
    current = spec.limits.as_dict()
    lowered = {
        name: type(current[name])(min(current[name], value))
        for name, value in (limits or {}).items()
        if name in current
    }
    hosts = spec.egress if egress is None else tuple(h for h in spec.egress if h in set(egress))
    private = tuple(h for h in hosts if h in set(private_egress or ()))
    if not lowered and hosts == spec.egress and private == spec.private_egress:
        return spec
    return replace(
        spec, limits=replace(spec.limits, **lowered), egress=hosts, private_egress=private
    )


def _specs_from(obj: Any, origin: str) -> Iterable[ToolSpec]:
    items = obj if isinstance(obj, list | tuple) else [obj]
    for item in items:
        if not isinstance(item, ToolSpec):
            raise RegistryError(f"{origin} gave {type(item).__name__}, not a ToolSpec")
        yield item


def load_tools(extra_modules: Iterable[str] = ()) -> dict[str, ToolSpec]:
    """Every tool from the entry points and the extra modules, by name."""
    tools: dict[str, ToolSpec] = {}

    def add(spec: ToolSpec, origin: str) -> None:
        if spec.private_egress:
            raise RegistryError(
                f"tool {spec.name!r} ({origin}) declares private_egress: only policy grants it",
                tool=spec.name,
            )
        if spec.name in tools and tools[spec.name] is not spec:
            raise RegistryError(f"tool {spec.name!r} registered twice ({origin})", tool=spec.name)
        tools[spec.name] = spec

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as e:  # a broken plugin must name itself
            raise RegistryError(f"entry point {ep.name!r} failed to load: {e}") from e
        for spec in _specs_from(loaded, f"entry point {ep.name!r}"):
            add(spec, f"entry point {ep.name!r}")
    for module_name in extra_modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RegistryError(f"TOOLPLANE_EXTRA_TOOLS module {module_name!r}: {e}") from e
        found = getattr(module, "TOOLS", None) or getattr(module, "TOOL", None)
        if found is None:
            raise RegistryError(f"module {module_name!r} defines neither TOOLS nor TOOL")
        for spec in _specs_from(found, f"module {module_name!r}"):
            add(spec, f"module {module_name!r}")
    return tools
