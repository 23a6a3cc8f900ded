"""The node and run state machines: every listed transition works, every other is refused."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from control.orchestration.states import (
    FAILING_NODE,
    NODE_TRANSITIONS,
    RUN_TRANSITIONS,
    TERMINAL_NODE,
    TERMINAL_RUN,
    IllegalTransition,
    NodeStatus,
    RunStatus,
    move_node,
    move_run,
)

NOW = datetime(2026, 11, 28, tzinfo=UTC)
PAIRS_NODE = [(a, b) for a in NodeStatus for b in NodeStatus]
PAIRS_RUN = [(a, b) for a in RunStatus for b in RunStatus]


@dataclass
class Row:
    status: str
    updated_at: datetime = datetime(2000, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(("start", "to"), PAIRS_NODE)
def test_node_transitions(start: NodeStatus, to: NodeStatus) -> None:
    row = Row(start.value)
    if to in NODE_TRANSITIONS[start]:
        move_node(row, to, NOW)
        assert (row.status, row.updated_at) == (to, NOW)
    else:
        with pytest.raises(IllegalTransition, match=f"node {start} -> {to}"):
            move_node(row, to, NOW)
        assert row.status == start  # unchanged


@pytest.mark.parametrize(("start", "to"), PAIRS_RUN)
def test_run_transitions(start: RunStatus, to: RunStatus) -> None:
    row = Row(start.value)
    if start == to:
        assert move_run(row, to, NOW) is False
        assert row.updated_at != NOW
    elif to in RUN_TRANSITIONS[start]:
        assert move_run(row, to, NOW) is True
        assert row.status == to
    else:
        with pytest.raises(IllegalTransition):
            move_run(row, to, NOW)


def test_the_contract_statuses() -> None:
    assert {s.value for s in TERMINAL_NODE} == {
        "denied",
        "completed",
        "failed",
        "rejected",
        "timed_out",
        "cancelled",
    }
    assert {s.value for s in TERMINAL_RUN} == {"completed", "failed", "denied", "cancelled"}
    assert FAILING_NODE < TERMINAL_NODE
    # Only a queued node goes back to pending (a lost attempt waiting for its retry).
    assert [s for s in NodeStatus if NodeStatus.PENDING in NODE_TRANSITIONS[s]] == [
        NodeStatus.QUEUED
    ]
    # Every node can be cancelled until it ends; nothing leaves an end.
    for status in NodeStatus:
        assert (NodeStatus.CANCELLED in NODE_TRANSITIONS[status]) == (status not in TERMINAL_NODE)
