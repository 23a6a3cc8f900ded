"""The sandbox worker's composition root: one process serving one tool's queue."""

from __future__ import annotations

import logging
from pathlib import Path

from sandbox_tasks.bwrap import BwrapExecutor, bwrap_path, probe_bwrap
from sandbox_tasks.errors import RegistryError
from sandbox_tasks.executor import ForkExecutor
from sandbox_tasks.keys import KeyStoreKeys
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

__all__ = ["build_deps", "run_worker"]


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
    keys = KeyStoreKeys(KeyStore(settings.keys_dir), owner=f"tool.{tool}")
    scratch = settings.home / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return WorkerDeps(
        spec=tools[tool],
        executor=make_executor(settings, tools[tool], scratch),
        keys=keys,
        claims=make_claims(broker_url, tool),
        context=ToolContext(
            repo_root=settings.repo_root,
            docs_root=settings.docs_root,
            scratch_dir=Path(scratch),
        ),
        worker_name=default_worker_name(tool),
    )


WEAK = "fork-rlimits (weak: no namespaces)"


def make_executor(settings: Settings, spec: ToolSpec, scratch: Path) -> Executor:
    """bubblewrap where the host allows it; weaker only where the operator said so."""
    binary = bwrap_path()
    problem = probe_bwrap(binary)
    if problem is None:
        assert binary is not None
        return BwrapExecutor(
            binary=binary,
            spec=spec,
            repo_root=settings.repo_root,
            docs_root=settings.docs_root,
            extra_modules=settings.extra_tool_modules,
            forbidden=[settings.home, settings.keys_dir],
        )
    if not settings.allow_weak_containment:
        raise SettingsError(
            f"cannot contain tools here ({problem}); set TOOLPLANE_ALLOW_WEAK_CONTAINMENT=true "
            "to run them in rlimited children without namespaces (recorded in every receipt)",
            setting="ALLOW_WEAK_CONTAINMENT",
        )
    log.warning("sandbox.weak tool=%s reason=%s: NO network or mount isolation", spec.name, problem)
    return ForkExecutor(scratch_root=scratch, containment=WEAK)


def run_worker(
    settings: Settings,
    tool: str,
    *,
    broker_url: str,
    concurrency: int = 1,
    autoscale: str | None = None,
    loglevel: str = "INFO",
) -> None:
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
    log.info("worker.starting tool=%s containment=%s", tool, deps.executor.containment)
    app.worker_main(argv)
