"""Broker and queue configuration shared by both planes.

Tool ``X`` is the task ``tool.X`` on the queue ``tool.X``; results are the task
``control.ingest_result`` on the queue ``results``. JSON only, acks late,
reject on worker lost, prefetch 1, events on.
"""

from __future__ import annotations

from typing import Any

RESULTS_QUEUE = "results"
INGEST_TASK = "control.ingest_result"
MANIFEST_TASK = "control.register_manifest"
TOOL_PREFIX = "tool."

__all__ = [
    "INGEST_TASK",
    "MANIFEST_TASK",
    "RESULTS_QUEUE",
    "TOOL_PREFIX",
    "build_config",
    "claims_prefix",
    "route_task",
    "tool_queue",
    "unacked_keys",
]


def tool_queue(tool: str) -> str:
    return f"{TOOL_PREFIX}{tool}"


def unacked_keys(owner: str) -> dict[str, str]:
    """kombu's unacked hash, index and mutex of one consumer kind (each tool's workers, Flower).

    kombu shares ``unacked``, ``unacked_index`` and ``unacked_mutex`` between every consumer of a
    Redis database; keys of their own let the broker's ACL keep each tool's workers to theirs
    (control.broker.acl). A message held by a dead worker is restored by the next consumer of the
    same keys: another worker of that tool, or the same one started again.
    """
    return {
        "unacked_key": f"unacked.{owner}",
        "unacked_index_key": f"unacked_index.{owner}",
        "unacked_mutex_key": f"unacked_mutex.{owner}",
    }


def claims_prefix(tool: str) -> str:
    """Where a tool's workers keep their job claims (sandbox_tasks.claims): theirs alone."""
    return f"toolplane:claim:{tool_queue(tool)}:"


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
    """Celery router: each tool task to its own queue, control tasks to ``results``."""
    if name.startswith(TOOL_PREFIX):
        return {"queue": name, "routing_key": name}
    if name in (INGEST_TASK, MANIFEST_TASK):
        return {"queue": RESULTS_QUEUE, "routing_key": RESULTS_QUEUE}
    return None


RESTORE_INTERVAL_S = 2
"""How often a consumer looks for messages whose visibility timeout passed (kombu's default
sweep runs every 10 s x 10 = 100 s)."""


def build_config(
    broker_url: str, *, visibility_timeout: int = 30, unacked_owner: str | None = None
) -> dict[str, Any]:
    """The Celery configuration of either plane for ``broker_url``.

    ``unacked_owner`` gives a consumer kind its own unacked keys (see ``unacked_keys``); the
    control keeps kombu's defaults.
    """
    own_keys = unacked_keys(unacked_owner) if unacked_owner else {}
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # On Redis, a job held by a dead worker comes back after this many seconds
            # (plus at most one restore sweep); envelope expiry is set longer than this
            # plus the tool's run time, and attempts are overdue only after expiry.
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": RESTORE_INTERVAL_S,
            "unacked_restore_throttle": 1,
            **own_keys,
        },
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_routes": (route_task,),
        "task_default_queue": RESULTS_QUEUE,
        "worker_hijack_root_logger": False,
        "worker_enable_remote_control": True,
        "enable_utc": True,
    }
