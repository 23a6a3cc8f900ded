"""Result ingest: verify each receipt, bind it to a dispatched attempt, accept once.

Acceptance is exactly once per node: the run is locked (then its nodes), and a
result is accepted only while its node is ``queued`` at that very attempt. What
is not accepted is recorded: ToolReceiptInvalid, JobRefused, or ResultIgnored
for a verified result that came too late (a redelivered copy, an attempt that
was superseded by a retry, a node that was cancelled). An accepted result
advances the run: nodes that needed it are decided and dispatched in the same
transaction.

A receipt's key (and a manifest's) is judged by when the control receives the
message, under a lock on the key's row (control.governance.keys.judge_key), never by the
message's own timestamps; the evidence is recorded at that very time, which is what
the ledger's verification judges the key by later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from control.governance.keys import judge_key
from control.orchestration.intake import Governance, dispatching
from control.orchestration.orchestrator import (
    RunState,
    advance,
    lock_run,
    mark_ready,
    schedule_retry,
    settle_run,
)
from control.orchestration.states import NodeStatus, move_node
from ledger.chain import NewEvent
from ledger.models import Attempt, Node
from ledger.receipts import ReceiptProblem, check_result_message
from ledger.store import append_events
from toolplane.canonical import CanonicalJSONError, check_json_value, contains_nul, digest
from toolplane.messages import ResultMessage, job_id_for
from toolplane.signing import KeyRing

log = logging.getLogger("toolplane.ingest")

__all__ = [
    "Ingested",
    "Outcome",
    "Settle",
    "ingest_result",
    "record_unprocessable",
]


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    """A verified result was accepted for its node and attempt."""
    RECEIPT_INVALID = "receipt_invalid"
    """Signature, hash or binding failed; recorded as ToolReceiptInvalid."""
    REFUSED = "refused"
    """A worker's signed refusal; recorded as JobRefused."""
    IGNORED = "ignored"
    """A verified result too late for its node (settled, superseded, cancelled): recorded
    as ResultIgnored, not accepted."""


def _safe(raw: Any) -> Any:
    """What we can store of an untrusted message: itself if JSON-safe, else its repr."""
    try:
        check_json_value(raw)
        digest(raw)
    except CanonicalJSONError:
        return {"unparseable": repr(raw)[:4000]}
    if contains_nul(raw):  # repr escapes it
        return {"unparseable": repr(raw)[:4000]}
    return raw


def _claimed(raw: Any) -> tuple[str | None, str | None, int | None]:
    result = raw.get("result") if isinstance(raw, dict) else None
    if not isinstance(result, dict):
        return None, None, None
    run_id, node_id, attempt = result.get("run_id"), result.get("node_id"), result.get("attempt")

    def ident(value: Any) -> str | None:  # an id the database can look up
        ok = isinstance(value, str) and 0 < len(value) <= 200 and "\x00" not in value
        return value if ok else None

    return (
        ident(run_id),
        ident(node_id),
        attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
    )


def _receipt_key_id(raw: Any) -> object:
    receipt = raw.get("receipt") if isinstance(raw, dict) else None
    return receipt.get("key_id") if isinstance(receipt, dict) else None


def _attempt_of(session: Session, envelope_sha256: str) -> Attempt | None:
    return session.scalar(select(Attempt).where(Attempt.envelope_sha256 == envelope_sha256))


Settle = Callable[[str, str, int | None], None]
"""Settle a job's entitlement reservation: (tenant id, job id, charged ms or None for all)."""


def _no_settle(tenant_id: str, job_id: str, charged_ms: int | None) -> None:
    return None


@dataclass(frozen=True)
class Ingested:
    outcome: Outcome
    outbox_ids: tuple[int, ...] = ()  # jobs of nodes that became ready: publish after commit


def ingest_result(
    session: Session,
    raw: Any,
    keys: KeyRing,
    gov: Governance,
    settle: Settle = _no_settle,
) -> Ingested:
    """Ingest one message from the ``results`` queue; advance its run. Commits.

    ``settle`` is told how much tool time each settled job used (its verified
    duration when it ran; nothing when it failed without running or was refused;
    all it reserved when its receipt is invalid), before the commit, and is
    idempotent per job.
    """
    run_id, node_id, attempt = _claimed(raw)
    state = lock_run(session, run_id) if run_id else None
    node = state.nodes.get(node_id) if state is not None and node_id else None
    if node is None and state is not None:
        session.rollback()  # a run without that node: hold no lock while looking elsewhere
        state = None
    # When the control receives it: the key's trust and every event's time.
    keys, now = judge_key(session, keys, _receipt_key_id(raw))
    events: list[NewEvent] = []
    tenant = state.run.tenant_id if state is not None else None

    def current(n: Node | None, number: int | None) -> bool:
        return n is not None and n.status == NodeStatus.QUEUED and number == n.attempt

    def finish(outcome: Outcome) -> Ingested:
        append_events(session, events, at=now)
        session.commit()
        return Ingested(outcome)

    def invalid(problem: str) -> Ingested:
        log.warning("receipt.invalid run=%s node=%s problem=%s", run_id, node_id, problem)
        events.append(
            NewEvent(
                "ToolReceiptInvalid",
                {
                    "problem": problem,
                    "claimed": {"run_id": run_id, "node_id": node_id, "attempt": attempt},
                    "message": _safe(raw),
                },
                tenant_id=tenant,
                run_id=run_id if state is not None else None,
            )
        )
        if state is not None and node is not None and current(node, attempt):
            settle(state.run.tenant_id, job_id_for(state.run.id, node.node_id, node.attempt), None)
            _close_attempt(session, node, "rejected", now)
            move_node(node, NodeStatus.REJECTED, now)
            node.error = {"code": "receipt_invalid", "message": problem}
            settle_run(session, state, events, now)
        return finish(Outcome.RECEIPT_INVALID)

    if contains_nul(raw):
        return invalid("message contains NUL characters, which the ledger cannot store")
    try:
        message: ResultMessage = check_result_message(raw, keys, received=now)
    except ReceiptProblem as e:
        return invalid(e.message)
    result = message.result
    body = message.model_dump(mode="json")
    dispatched = _attempt_of(session, result.envelope_sha256) if result.envelope_sha256 else None
    if result.kind == "refusal" and dispatched is not None and state is None:
        # A worker that could not verify an envelope trusts none of its ids, but names
        # the digest of what it received: the exact envelope we dispatched.
        state = lock_run(session, dispatched.run_id)
        node = state.nodes.get(dispatched.node_id) if state is not None else None
        tenant = state.run.tenant_id if state is not None else None
        run_id = dispatched.run_id
    bound = (
        dispatched is not None
        and node is not None
        and (dispatched.run_id, dispatched.node_id) == (node.run_id, node.node_id)
        and result.tool == node.tool
        and (result.kind == "refusal" or result.attempt == dispatched.attempt)
    )

    if result.kind == "refusal":
        code = result.error.code if result.error else "envelope_invalid"
        events.append(
            NewEvent(
                "JobRefused",
                {"bound": bound, "code": code, "message": body},
                tenant_id=tenant if bound else None,
                run_id=run_id if bound else None,
            )
        )
        if bound and state is not None and node is not None and code != "replay":
            assert dispatched is not None
            if current(node, dispatched.attempt):
                _refused(session, state, node, code, result, message, settle, events, now)
            elif dispatched.settled_at is None:  # a superseded attempt: its tool did not run
                settle(state.run.tenant_id, dispatched.job_id, 0)
                dispatched.settled_at = now
        return finish(Outcome.REFUSED)

    if not bound or state is None or node is None or dispatched is None:
        return invalid("result is not bound to a dispatched envelope of this node and attempt")
    # A failure is refunded, except a call cut off at its time limit: it spent that time.
    timed_out = result.error is not None and result.error.code == "timeout"
    charged = result.duration_ms if result.ok or timed_out else 0
    if not current(node, dispatched.attempt):
        # A late copy, or the result of an attempt that was superseded or cancelled: it is
        # evidence (its receipt verifies), but the node accepts one result only.
        if dispatched.settled_at is None:
            settle(state.run.tenant_id, dispatched.job_id, charged)
            dispatched.settled_at = now
        log.info("result.ignored run=%s node=%s attempt=%s", run_id, node_id, result.attempt)
        events.append(
            state.event(
                "ResultIgnored",
                {
                    "node_id": node.node_id,
                    "attempt": dispatched.attempt,
                    "reason": (
                        f"the node is {node.status}"
                        + (
                            f" at attempt {node.attempt}"
                            if node.attempt != dispatched.attempt
                            else ""
                        )
                    ),
                    "result_sha256": result.result_sha256,
                    "message": body,
                },
            )
        )
        return finish(Outcome.IGNORED)
    settle(state.run.tenant_id, dispatched.job_id, charged)
    _close_attempt(session, node, "completed" if result.ok else "failed", now)
    move_node(node, NodeStatus.COMPLETED if result.ok else NodeStatus.FAILED, now)
    node.result = result.result
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
            },
        )
    )
    # The acceptance commits on its own: nothing that deciding the next nodes may meet (a
    # policy error, an entitlement store that is down) can take the result back with it.
    # What became ready is marked due, and decided now, or else by the sweeper.
    settle_run(session, state, events, now)
    ready = mark_ready(state, now)
    append_events(session, events, at=now)
    session.commit()
    if not ready:
        return Ingested(Outcome.ACCEPTED)
    return Ingested(Outcome.ACCEPTED, _advance_now(session, gov, state.run.id))


def _advance_now(session: Session, gov: Governance, run_id: str) -> tuple[int, ...]:
    try:
        state = lock_run(session, run_id)
        assert state is not None
        events: list[NewEvent] = []
        with dispatching(session, gov) as done:
            advance(session, gov, state, events, done)
            append_events(session, events)
        return tuple(done.outbox_ids)
    except Exception:  # accepted already: the sweeper decides the ready nodes
        session.rollback()
        log.warning("advance.deferred run=%s (the sweeper retries)", run_id, exc_info=True)
        return ()


def record_unprocessable(session: Session, raw: Any, error: BaseException) -> None:
    """Evidence of a message that ingest failed on again and again (then acknowledged)."""
    append_events(
        session,
        [
            NewEvent(
                "IngestFailed",
                {"error": f"{type(error).__name__}: {error}"[:2000], "message": _safe(raw)},
            )
        ],
    )
    session.commit()


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
    result: Any,
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
    node.error = result.error.model_dump() if result.error else None
    node.due_at = None
    settle_run(session, state, events, now)
