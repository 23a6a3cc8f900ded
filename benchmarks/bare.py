"""The baseline: the same tool work as a bare Celery task, as a user would write it.

Runs ``read_repo_file``'s own function in the worker process, with the Redis
result backend and ``delay().get()``: no policy, no envelope, no containment,
no receipt, no ledger. Started as ``python -m benchmarks.bare WORKER-ARGS``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from celery import Celery

from sandbox_tasks.registry import ToolContext
from sandbox_tasks.tools.read_repo_file import TOOL

QUEUE = "bench.bare"
TASK = "bench.read_repo_file"


def make_app(broker_url: str, backend_url: str, repo_root: Path) -> Celery:
    app = Celery("bench-bare", broker=broker_url, backend=backend_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
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

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--repo-root", required=True, type=Path)
    parser.add_argument("--concurrency", type=int, default=2)
    ns = parser.parse_args()
    app = make_app(ns.broker, ns.backend, ns.repo_root)
    app.worker_main(
        [
            "worker",
            "-Q",
            QUEUE,
            "-n",
            "bare@%h",
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
