"""The sandbox worker's composition root: one process serving one tool's queue."""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
from pathlib import Path

from sandbox_tasks import cgroups, prctl
from sandbox_tasks.bwrap import BwrapExecutor, bwrap_path, probe_bwrap
from sandbox_tasks.confine import worker_layers
from sandbox_tasks.confine.trees import read_only_trees
from sandbox_tasks.errors import RegistryError
from sandbox_tasks.keys import KeyStoreKeys
from sandbox_tasks.metrics import WorkerMetrics, serve_metrics
from sandbox_tasks.plain import PlainExecutor
from sandbox_tasks.registry import ToolContext, ToolSpec, load_tools
from sandbox_tasks.worker import (
    Executor,
    WorkerDeps,
    build_worker_app,
    default_worker_name,
    make_claims,
)
from toolplane.errors import SettingsError
from toolplane.keystore import KeyStore
from toolplane.lifetimes import MAX_ENVELOPE_LIFETIME_S
from toolplane.settings import Settings

log = logging.getLogger("toolplane.worker")

__all__ = ["build_deps", "check_access", "run_worker"]


def _who() -> str:
    uid = os.geteuid()
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _blocked(path: Path) -> Path | None:
    """The first directory on the way to ``path`` this process may not search, if any."""
    return next((p for p in [*reversed(path.parents), path] if not os.access(p, os.X_OK)), None)


def check_access(settings: Settings, spec: ToolSpec) -> None:
    """Refuse to start, naming the setting, if this worker cannot read a directory it needs:
    its home (its keys) and each data root the tool declares (bound into the sandbox);
    a root the tool declares that the operator did not map is refused too.

    A worker may run as a user of its own (``toolplane up`` as root); the directories the
    operator names must then be readable by that user, the directories above them too.
    """
    needs = [("TOOLPLANE_HOME", settings.home)]
    roots = settings.roots_for(spec.data_roots)
    for name in spec.data_roots:
        if name not in roots:
            raise SettingsError(
                f"tool {spec.name} reads the data root {name!r}, which no directory is mapped "
                f'to: add it to TOOLPLANE_DATA_ROOTS (JSON, {{"{name}": "/dir"}})',
                setting="TOOLPLANE_DATA_ROOTS",
            )
        needs.append((settings.root_setting(name), roots[name]))
    for setting, path in needs:
        if os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK):
            continue
        blocked = _blocked(path)
        if blocked is not None and blocked != path and os.path.exists(blocked):
            why = f"{blocked} may not be searched (mode {blocked.stat().st_mode & 0o777:04o})"
        elif not os.path.exists(path):
            why = "no such directory"
        else:
            why = f"mode {path.stat().st_mode & 0o777:04o}, owner uid {path.stat().st_uid}"
        raise SettingsError(
            f"{path} is not readable by this worker, {_who()}: {why}; it and every directory "
            "above it must be open to that user",
            setting=setting,
        )


def build_deps(settings: Settings, tool: str, *, broker_url: str) -> WorkerDeps:
    tools = load_tools(settings.extra_tool_modules)
    if tool not in tools:
        raise RegistryError(f"unknown tool {tool!r} (known: {', '.join(sorted(tools))})", tool=tool)
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError("claims need a Redis broker (redis://...)", setting="BROKER_URL")
    lifetime = settings.queue_wait_s + settings.visibility_timeout + tools[tool].limits.timeout_s
    if lifetime > MAX_ENVELOPE_LIFETIME_S:
        raise SettingsError(
            f"the time limit of {tool} ({tools[tool].limits.timeout_s:g} s) + QUEUE_WAIT_S + "
            f"VISIBILITY_TIMEOUT make its envelopes live {lifetime:g} s, over the bound of "
            f"{MAX_ENVELOPE_LIFETIME_S} s: the control would sign none of its jobs",
            setting="QUEUE_WAIT_S",
        )
    check_access(settings, tools[tool])
    keys = KeyStoreKeys(KeyStore(settings.keys_dir), owner=f"tool.{tool}")
    scratch = settings.home / "scratch"  # the plain runners' scratch roots, the heartbeat
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        if not os.access(scratch, os.W_OK | os.X_OK):
            raise PermissionError(f"mode {scratch.stat().st_mode & 0o777:04o}")
    except OSError as e:
        raise SettingsError(
            f"{scratch} is not writable by this worker, {_who()}: {e}", setting="TOOLPLANE_HOME"
        ) from e
    return WorkerDeps(
        spec=tools[tool],
        executor=make_executor(settings, tools[tool], scratch),
        keys=keys,
        claims=make_claims(broker_url, tool),
        context=tool_context(settings, tools[tool], Path(scratch)),
        worker_name=default_worker_name(tool),
    )


def tool_context(settings: Settings, spec: ToolSpec, scratch: Path) -> ToolContext:
    """The context of a tool's calls: only the data roots it declares."""
    roots = settings.roots_for(spec.data_roots)
    return ToolContext(
        scratch_dir=scratch, repo_root=roots.get("repo"), docs_root=roots.get("docs"), roots=roots
    )


def make_executor(settings: Settings, spec: ToolSpec, scratch: Path) -> Executor:
    """bubblewrap where the host allows it; runners without namespaces only where the
    operator said so. Either way each call runs in a fresh process of its own (never a fork
    of this worker), in per-tenant warm runners (``sandbox_warm_runners`` per process)."""
    binary = bwrap_path()
    problem = probe_bwrap(binary)
    layers = worker_layers(
        settings.sandbox_layers_required(namespaces=problem is None),
        read_only=read_only_trees(spec, tool_context(settings, spec, scratch)),
        forbidden=[settings.keys_dir],
    )
    if (no_cgroup := cgroups.problem()) is not None:
        log.warning(
            "sandbox.no_pids_cgroup tool=%s reason=%s: each call's RLIMIT_NPROC is the "
            "process cap (it binds a worker user that is not root), and every call gets a "
            "fresh runner (nothing else proves that a call left no process behind)",
            spec.name,
            no_cgroup,
        )
    if problem is None:
        assert binary is not None
        return BwrapExecutor(
            binary=binary,
            spec=spec,
            roots=settings.roots_for(spec.data_roots),
            extra_modules=settings.extra_tool_modules,
            forbidden=[settings.home, settings.keys_dir],
            max_runners=settings.sandbox_warm_runners,
            layers=layers,
        )
    if not settings.allow_weak_containment:
        raise SettingsError(
            f"cannot contain tools here ({problem}); set TOOLPLANE_ALLOW_WEAK_CONTAINMENT=true "
            "to run them in runners without namespaces (recorded in every receipt)",
            setting="ALLOW_WEAK_CONTAINMENT",
        )
    log.warning("sandbox.weak tool=%s reason=%s: NO network or mount isolation", spec.name, problem)
    return PlainExecutor(
        spec=spec,
        roots=settings.roots_for(spec.data_roots),
        extra_modules=settings.extra_tool_modules,
        scratch_root=scratch,
        max_runners=settings.sandbox_warm_runners,
        layers=layers,
    )


def run_worker(
    settings: Settings,
    tool: str,
    *,
    broker_url: str,
    concurrency: int = 1,
    autoscale: str | None = None,
    loglevel: str = "INFO",
    quiet: bool = False,
) -> None:
    # The receipt key will be in this process's memory (and its pool children's, which
    # inherit this): no process of the same user may read it through /proc or ptrace.
    prctl.set_not_dumpable()
    metrics = None
    if settings.worker_metrics_bind:  # off unless set; served by this (the main) process,
        metrics = WorkerMetrics(tool)  # its socket bound and its token read before confining
        serve_metrics(metrics, settings.worker_metrics_bind, settings.worker_metrics_token_file)
    deps = build_deps(settings, tool, broker_url=broker_url)
    if deps.spec.limits.timeout_s >= settings.visibility_timeout:
        log.warning(
            "worker.visibility_timeout tool=%s timeout_s=%s visibility_timeout=%s: a running "
            "job comes back to the queue before it can finish; its claim stops a second run, "
            "but set TOOLPLANE_VISIBILITY_TIMEOUT above the tool's time limit",
            tool,
            deps.spec.limits.timeout_s,
            settings.visibility_timeout,
        )
    if metrics is not None:
        deps = dataclasses.replace(deps, metrics=metrics)
    app = build_worker_app(
        deps,
        broker_url=broker_url,
        visibility_timeout=settings.visibility_timeout,
        queue_wait_s=settings.queue_wait_s,
    )
    argv = [
        "worker",
        "-Q",
        f"tool.{tool}",
        "-n",
        f"{tool}@%h",
        "--concurrency",
        str(concurrency),
        "-E",
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        loglevel,
    ]
    if autoscale:
        argv.append(f"--autoscale={autoscale}")
    if quiet:  # Celery's option, before its command
        argv.insert(0, "--quiet")
    log.info(
        "worker.starting tool=%s containment=%s user=%s home=%s",
        tool,
        deps.executor.containment,
        _who(),
        settings.home,
    )
    app.worker_main(argv)
