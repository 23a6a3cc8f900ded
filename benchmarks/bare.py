"""The baseline: the same tool work as a bare Celery task, as a user would write it.

Runs ``read_repo_file``'s own function in the worker process, with the Redis
result backend and ``delay().get()``: no policy, no envelope, no containment,
no receipt, no ledger. Started as ``python -m benchmarks.bare WORKER-ARGS``.

With ``--sandboxed`` the task runs the function as a toolplane worker does: in a warm
runner (bubblewrap where the host allows it, else without namespaces) with the kernel
layers this host has, in a fresh forked process per call, the runner checked after each
call. Still no policy, envelope, receipt or ledger: the difference between this side and
the bare one is what the clean sandbox per call costs; between it and the governed path,
what governance costs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from celery import Celery

from sandbox_tasks.registry import ToolContext
from sandbox_tasks.tools.read_repo_file import TOOL

QUEUE = "bench.bare"
TASK = "bench.read_repo_file"
SANDBOXED_QUEUE = "bench.bare_sandboxed"
SANDBOXED_TASK = "bench.read_repo_file_sandboxed"


def _executor(repo_root: Path, scratch: Path) -> Any:
    """The executor a toolplane worker would pick on this host, with the layers it would
    apply (``sandbox_tasks.main.make_executor`` without the worker's settings)."""
    from sandbox_tasks.bwrap import BwrapExecutor, bwrap_path, probe_bwrap
    from sandbox_tasks.confine import available
    from sandbox_tasks.plain import PlainExecutor

    layers = tuple(n for n in available() if n != "rlimits")
    roots = {"repo": repo_root, "docs": repo_root}
    binary = bwrap_path()
    if probe_bwrap(binary) is None:
        assert binary is not None
        return BwrapExecutor(
            binary=binary, spec=TOOL, roots=roots, extra_modules=[], forbidden=[], layers=layers
        )
    return PlainExecutor(
        spec=TOOL, roots=roots, extra_modules=[], scratch_root=scratch, layers=layers
    )


def make_app(
    broker_url: str, backend_url: str, repo_root: Path, *, sandboxed: bool = False
) -> Celery:
    app = Celery("bench-bare", broker=broker_url, backend=backend_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_default_queue=SANDBOXED_QUEUE if sandboxed else QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    ctx = ToolContext(
        repo_root=repo_root, docs_root=repo_root, scratch_dir=Path(tempfile.gettempdir())
    )

    @app.task(name=TASK)
    def read_repo_file(path: str) -> dict[str, Any]:
        args = TOOL.args_model.model_validate({"path": path})
        return TOOL.func(args, ctx).model_dump(mode="json")

    executors: dict[int, Any] = {}  # one per pool process, made on its first call

    @app.task(name=SANDBOXED_TASK)
    def read_repo_file_sandboxed(path: str) -> dict[str, Any]:
        args = TOOL.args_model.model_validate({"path": path})
        executor = executors.get(os.getpid())
        if executor is None:
            scratch = Path(tempfile.mkdtemp(prefix="tpbench-bare-"))
            executor = executors[os.getpid()] = _executor(repo_root, scratch)
        outcome = executor.run(TOOL, args, ctx, tenant="bench")
        if not outcome.ok:
            raise RuntimeError(f"{outcome.error_code}: {outcome.error_message}")
        return dict(outcome.result)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--repo-root", required=True, type=Path)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--sandboxed", action="store_true", help="the tool in a warm runner")
    ns = parser.parse_args()
    app = make_app(ns.broker, ns.backend, ns.repo_root, sandboxed=ns.sandboxed)
    app.worker_main(
        [
            "worker",
            "-Q",
            SANDBOXED_QUEUE if ns.sandboxed else QUEUE,
            "-n",
            "bare-sandboxed@%h" if ns.sandboxed else "bare@%h",
            "--concurrency",
            str(ns.concurrency),
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
        ]
    )


if __name__ == "__main__":
    main()
