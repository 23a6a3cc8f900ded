"""Deciding one verified result against its locked run: accept, refuse, ignore, or unbound.

Pure decisions over rows the caller has locked (control.orchestration.ingest): a result is
accepted only while its node is ``queued`` at that very attempt; a worker's signed refusal
is recorded as JobRefused; a verified result too late for its node (a redelivered copy, a
superseded or cancelled attempt) as ResultIgnored. Nothing here reads the database, locks,
appends or commits: the events go into the caller's list, the row changes into the
caller's session, and the caller appends and commits them together, for one result or
for a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from control.ops.metrics import note_node
from control.orchestration.artifacts import Artifacts, externalize_result
from control.orchestration.orchestrator import RunState, mark_ready, schedule_retry, settle_run
from control.orchestration.states import NodeStatus, move_node
from ledger.chain import NewEvent
from ledger.models import Attempt, Node
from toolplane.messages import ResultMessage, job_id_for

log = logging.getLogger("toolplane.ingest")

__all__ = ["Decided", "Outcome", "Settle", "StoredResult", "decide", "stored_result"]


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    """A verified result was accepted for its node and attempt."""
    RECEIPT_INVALID = "receipt_invalid"
    """Signature, hash or binding failed: nothing changed; recorded (once per distinct
    message) as ToolReceiptInvalid on the system chain."""
    REFUSED = "refused"
    """A worker's signed refusal; recorded as JobRefused."""
    IGNORED = "ignored"
    """A verified result too late for its node (settled, superseded, cancelled): recorded
    as ResultIgnored, not accepted."""


Settle = Callable[[str, str, int | None], None]
"""Settle a job's entitlement reservation: (tenant id, job id, charged ms or None for all)."""


@dataclass(frozen=True)
class StoredResult:
    """What the ledger keeps of a verified result message."""

    body: dict[str, Any]
    """The message as its evidence event records it (``message`` in the payload)."""
    result: Any
    """The node's ``result`` column."""


def stored_result(message: ResultMessage) -> StoredResult:
    """A verified result's payload as stored: the evidence body and the node's result
    (before a large result is moved to the artifact store, :func:`externalize_result`)."""
    return StoredResult(body=message.model_dump(mode="json"), result=message.result.result)


@dataclass(frozen=True)
class Decided:
    outcome: Outcome
    ready: bool = False
    """Nodes of the run became ready (marked due): decide them after the commit."""


def decide(
    session: Session,
    message: ResultMessage,
    state: RunState | None,
    dispatched: Attempt | None,
    settle: Settle,
    events: list[NewEvent],
    now: datetime,
    artifacts: Artifacts | None = None,
) -> Decided | None:
    """Apply one verified result to its locked run; None when it is not bound to
    ``dispatched`` (then nothing was changed and no event added).

    ``dispatched`` is the attempt whose envelope digest the verified result names, and
    ``state`` its run, locked, with the attempt's row loaded in ``session``."""
    result = message.result
    node = state.nodes.get(dispatched.node_id) if state and dispatched else None
    bound = (
        dispatched is not None
        and node is not None
        and result.tool == node.tool
        and (
            result.kind == "refusal"  # a refusal trusts no id of what it could not verify
            or (result.run_id, result.node_id, result.attempt)
            == (dispatched.run_id, dispatched.node_id, dispatched.attempt)
        )
    )
    stored = stored_result(message)
    if result.kind == "refusal":
        # A worker that could not verify an envelope trusts none of its ids, but names
        # the digest of what it received: bound when that is the exact envelope we
        # dispatched to that tool.
        code = result.error.code if result.error else "envelope_invalid"
        run = state.run if bound and state is not None else None
        events.append(
            NewEvent(
                "JobRefused",
                {"bound": bound, "code": code, "message": stored.body},
                tenant_id=run.tenant_id if run is not None else None,
                run_id=run.id if run is not None else None,
            )
        )
        if bound and state is not None and node is not None and code != "replay":
            assert dispatched is not None
            if _current(node, dispatched.attempt):
                _refused(session, state, node, code, message, settle, events, now)
            elif dispatched.settled_at is None:  # a superseded attempt: its tool did not run
                settle(state.run.tenant_id, dispatched.job_id, 0)
                dispatched.settled_at = now
        return Decided(Outcome.REFUSED)

    if not bound or state is None or node is None or dispatched is None:
        return None
    # A large result goes to the artifact store: the ledger keeps its hash and metadata.
    body, artifact = externalize_result(artifacts, stored.body, node)
    kept = {"artifact": artifact} if artifact else {}
    # A failure is refunded, except a call cut off at its time limit: it spent that time.
    timed_out = result.error is not None and result.error.code == "timeout"
    charged = result.duration_ms if result.ok or timed_out else 0
    if not _current(node, dispatched.attempt):
        # A late copy, or the result of an attempt that was superseded or cancelled: it is
        # evidence (its receipt verifies), but the node accepts one result only.
        if dispatched.settled_at is None:
            settle(state.run.tenant_id, dispatched.job_id, charged)
            dispatched.settled_at = now
        log.info(
            "result.ignored run=%s node=%s attempt=%s",
            node.run_id,
            node.node_id,
            dispatched.attempt,
        )
        at = f" at attempt {node.attempt}" if node.attempt != dispatched.attempt else ""
        events.append(
            state.event(
                "ResultIgnored",
                {
                    "node_id": node.node_id,
                    "attempt": dispatched.attempt,
                    "reason": f"the node is {node.status}{at}",
                    "result_sha256": result.result_sha256,
                    "message": body,
                    **kept,
                },
            )
        )
        return Decided(Outcome.IGNORED)
    settle(state.run.tenant_id, dispatched.job_id, charged)
    note_node(session, node, dispatched.dispatched_at)  # for the call's durations
    _close_attempt(session, node, "completed" if result.ok else "failed", now)
    move_node(node, NodeStatus.COMPLETED if result.ok else NodeStatus.FAILED, now)
    node.result, node.artifact = (None, artifact) if artifact else (stored.result, None)
    node.result_sha256 = result.result_sha256
    node.receipt = message.receipt.model_dump()
    node.error = result.error.model_dump() if result.error else None
    node.due_at = None
    events.append(
        state.event(
            "ToolCallCompleted" if result.ok else "ToolCallFailed",
            {
                "node_id": node.node_id,
                "attempt": node.attempt,
                "envelope_sha256": node.envelope_sha256,
                "result_sha256": result.result_sha256,
                "receipt_key_id": message.receipt.key_id,
                "message": body,
                **kept,
            },
        )
    )
    # What became ready is marked due here, and decided after the acceptance commits (or
    # else by the sweeper): nothing that deciding may meet can take the result back.
    settle_run(session, state, events, now)
    return Decided(Outcome.ACCEPTED, ready=mark_ready(state, now) > 0)


def _current(node: Node, number: int) -> bool:
    return node.status == NodeStatus.QUEUED and number == node.attempt


def _close_attempt(session: Session, node: Node, status: str, now: datetime) -> None:
    row = session.get(Attempt, (node.run_id, node.node_id, node.attempt))
    if row is not None:
        row.status = status
        row.settled_at = now


def _refused(
    session: Session,
    state: RunState,
    node: Node,
    code: str,
    message: ResultMessage,
    settle: Settle,
    events: list[NewEvent],
    now: datetime,
) -> None:
    """A worker refused the node's current attempt: the tool did not run. An expired
    envelope (the job waited too long for a worker) is retried while attempts remain."""
    settle(state.run.tenant_id, job_id_for(state.run.id, node.node_id, node.attempt), 0)
    _close_attempt(session, node, "refused", now)
    node.receipt = message.receipt.model_dump()
    if code == "envelope_expired" and node.attempt < node.max_attempts:
        schedule_retry(node, now)
        return
    move_node(node, NodeStatus.FAILED, now)
    error = message.result.error
    node.error = error.model_dump() if error else None
    node.due_at = None
    settle_run(session, state, events, now)
