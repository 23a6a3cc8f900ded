"""Run and node statuses of the public contract, and the only ways they may change.

Every status change goes through :func:`move_node` or :func:`move_run`, which
refuse a transition the tables below do not list (a bug, never a user error).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Protocol

__all__ = [
    "FAILING_NODE",
    "IllegalTransition",
    "NODE_TRANSITIONS",
    "NodeStatus",
    "RUN_TRANSITIONS",
    "RunStatus",
    "TERMINAL_NODE",
    "TERMINAL_RUN",
    "move_node",
    "move_run",
]


class RunStatus(StrEnum):
    RUNNING = "running"
    """Some node is not yet settled."""
    COMPLETED = "completed"
    """Every node completed."""
    FAILED = "failed"
    """A node failed, timed out or was rejected."""
    DENIED = "denied"
    """Policy or entitlements refused a node."""
    AWAITING_APPROVAL = "awaiting_approval"
    """A node waits for a human approval."""
    CANCELLED = "cancelled"
    """Cancelled by a principal."""


class NodeStatus(StrEnum):
    PENDING = "pending"
    """Not yet decided or dispatched: waits for its dependencies, or for a retry's backoff."""
    AWAITING_APPROVAL = "awaiting_approval"
    """Waits for an approval."""
    DENIED = "denied"
    """Refused by policy or entitlements."""
    QUEUED = "queued"
    """Dispatched as a signed job; no accepted result yet."""
    COMPLETED = "completed"
    """A verified result was accepted."""
    FAILED = "failed"
    """The tool failed, the worker refused the job, or the arguments could not be built."""
    REJECTED = "rejected"
    """A result came back with an invalid receipt."""
    TIMED_OUT = "timed_out"
    """No result in time, and no retry left (or the tool is not safe to retry)."""
    CANCELLED = "cancelled"
    """The run was cancelled, or failed elsewhere, before this node ended."""


N, R = NodeStatus, RunStatus

NODE_TRANSITIONS: dict[NodeStatus, frozenset[NodeStatus]] = {
    N.PENDING: frozenset({N.AWAITING_APPROVAL, N.QUEUED, N.DENIED, N.FAILED, N.CANCELLED}),
    N.AWAITING_APPROVAL: frozenset({N.QUEUED, N.DENIED, N.CANCELLED}),
    # QUEUED -> PENDING: the attempt was lost (or refused unrun) and a retry waits its backoff.
    N.QUEUED: frozenset({N.COMPLETED, N.FAILED, N.REJECTED, N.TIMED_OUT, N.CANCELLED, N.PENDING}),
    N.DENIED: frozenset(),
    N.COMPLETED: frozenset(),
    N.FAILED: frozenset(),
    N.REJECTED: frozenset(),
    N.TIMED_OUT: frozenset(),
    N.CANCELLED: frozenset(),
}
_ENDS = frozenset({R.COMPLETED, R.FAILED, R.DENIED, R.CANCELLED})
RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    R.RUNNING: _ENDS | {R.AWAITING_APPROVAL},
    R.AWAITING_APPROVAL: _ENDS | {R.RUNNING},
    R.COMPLETED: frozenset(),
    R.FAILED: frozenset(),
    R.DENIED: frozenset(),
    R.CANCELLED: frozenset(),
}

TERMINAL_NODE = frozenset(s for s, nexts in NODE_TRANSITIONS.items() if not nexts)
TERMINAL_RUN = frozenset(s for s, nexts in RUN_TRANSITIONS.items() if not nexts)
FAILING_NODE = frozenset({N.DENIED, N.FAILED, N.REJECTED, N.TIMED_OUT})
"""A node that ended so: its run fails (or is denied) and what remains is cancelled."""


class IllegalTransition(RuntimeError):
    """A status change the state machine does not allow: a bug, never a user's error."""


class _HasStatus(Protocol):
    status: str
    updated_at: datetime


def move_node(node: _HasStatus, to: NodeStatus, now: datetime) -> None:
    current = NodeStatus(node.status)
    if to not in NODE_TRANSITIONS[current]:
        raise IllegalTransition(f"node {current} -> {to} is not a transition")
    node.status = to
    node.updated_at = now


def move_run(run: _HasStatus, to: RunStatus, now: datetime) -> bool:
    """Move the run; False (and nothing changed) when it already is ``to``."""
    current = RunStatus(run.status)
    if current == to:
        return False
    if to not in RUN_TRANSITIONS[current]:
        raise IllegalTransition(f"run {current} -> {to} is not a transition")
    run.status = to
    run.updated_at = now
    return True
