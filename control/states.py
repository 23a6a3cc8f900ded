"""Run and node statuses of the public contract."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["NodeStatus", "RunStatus", "TERMINAL_NODE", "TERMINAL_RUN"]


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
    """Not yet decided or dispatched."""
    AWAITING_APPROVAL = "awaiting_approval"
    """Waits for an approval."""
    DENIED = "denied"
    """Refused by policy or entitlements."""
    QUEUED = "queued"
    """Dispatched as a signed job; no accepted result yet."""
    COMPLETED = "completed"
    """A verified result was accepted."""
    FAILED = "failed"
    """The tool failed, or the worker refused the job."""
    REJECTED = "rejected"
    """A result came back with an invalid receipt."""
    TIMED_OUT = "timed_out"
    """No result in time."""
    CANCELLED = "cancelled"
    """Cancelled before it ran."""


TERMINAL_NODE = frozenset(
    {
        NodeStatus.DENIED,
        NodeStatus.COMPLETED,
        NodeStatus.FAILED,
        NodeStatus.REJECTED,
        NodeStatus.TIMED_OUT,
        NodeStatus.CANCELLED,
    }
)
TERMINAL_RUN = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.DENIED, RunStatus.CANCELLED}
)
