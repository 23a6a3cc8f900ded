"""Result ingest: verify each receipt, bind it to a dispatched attempt, accept once.

Nothing unverified changes state. Any tool's workers may push onto ``results``, so
a message's ids are not looked up, and no run is locked, until its receipt verifies;
the run is then the one dispatched with the envelope digest that the verified
result names (its ``attempts`` row), and the result's tool, run, node and attempt
must be that attempt's. A message that does not verify or is not so bound changes
no node, run, attempt or reservation: it is recorded once, size-capped, as
ToolReceiptInvalid on the system chain, and counted
(control.orchestration.unverified). A node whose worker never answers with a
verified result times out like any lost attempt.

Acceptance is exactly once per node: the run is locked (then its nodes), and a
result is accepted only while its node is ``queued`` at that very attempt. What
else is verified and bound is recorded: JobRefused, or ResultIgnored for a result
that came too late (a redelivered copy, an attempt that was superseded by a retry,
a node that was cancelled). An accepted result advances the run: nodes that needed
it are decided and dispatched in the same transaction.

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

from control.governance.keys import judge_key, utc_now
from control.orchestration.artifacts import externalize_result
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
from control.orchestration.unverified import DETAIL_CAP, record_unverified
from ledger.chain import NewEvent
from ledger.models import Attempt, Node
from ledger.receipts import ReceiptProblem, check_result_message
from ledger.store import append_events
from toolplane.canonical import contains_nul
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
    """Signature, hash or binding failed: nothing changed; recorded (once per distinct
    message) as ToolReceiptInvalid on the system chain."""
    REFUSED = "refused"
    """A worker's signed refusal; recorded as JobRefused."""
    IGNORED = "ignored"
    """A verified result too late for its node (settled, superseded, cancelled): recorded
    as ResultIgnored, not accepted."""


def _claimed(raw: Any) -> dict[str, Any]:
    """The ids an unverified message names: kept as its claim, never looked up."""
    result = raw.get("result") if isinstance(raw, dict) else None
    if not isinstance(result, dict):
        return {}

    def ident(value: Any) -> str | None:  # short strings only: the rest is in the message
        return value if _storable(value, 200) else None

    attempt = result.get("attempt")
    return {
        "run_id": ident(result.get("run_id")),
        "node_id": ident(result.get("node_id")),
        "attempt": attempt if type(attempt) is int and abs(attempt) < 2**53 else None,
        "tool": ident(result.get("tool")),
    }


def _storable(value: Any, limit: int) -> bool:
    """A non-empty string of at most ``limit`` characters that the database can take (no
    NUL, no lone surrogate, which JSON may carry as an escape)."""
    if not isinstance(value, str) or not 0 < len(value) <= limit or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, storable (NUL and lone surrogates escaped)."""
    cut = value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return cut.replace("\x00", "\\x00")


def _receipt_key_id(raw: Any) -> object:
    """The key id a message names: it only selects the key to verify with (None when it
    could not name one)."""
    receipt = raw.get("receipt") if isinstance(raw, dict) else None
    key_id = receipt.get("key_id") if isinstance(receipt, dict) else None
    return key_id if _storable(key_id, 120) else None


def _dispatched_to(session: Session, envelope_sha256: str | None) -> tuple[str, str, int] | None:
    """Run, node and attempt dispatched with this (verified) envelope digest, if any."""
    if not envelope_sha256:
        return None
    row = session.execute(
        select(Attempt.run_id, Attempt.node_id, Attempt.attempt).where(
            Attempt.envelope_sha256 == envelope_sha256
        )
    ).first()
    return (row.run_id, row.node_id, row.attempt) if row is not None else None


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

    Nothing is looked up or locked by what the message says until its receipt verifies;
    then the run is found by the verified envelope digest (the attempt dispatched with
    it), never by the ids the message names. A message that does not verify, or is not
    bound to the attempt dispatched with that digest, changes nothing: it is recorded on
    the system chain (control.orchestration.unverified).

    ``settle`` is told how much tool time each settled job used (its verified
    duration when it ran; nothing when it failed without running or was refused),
    before the commit, and is idempotent per job.
    """
    # When the control receives it: the key's trust and every event's time. The key id
    # only selects the key to verify with.
    keys, now = judge_key(session, keys, _receipt_key_id(raw))

    def unverified(problem: str, detail: str) -> Ingested:
        session.rollback()  # no lock held while recording (a bound check may have taken one)
        claimed = _claimed(raw)
        log.warning(
            "receipt.invalid problem=%s claimed_run=%s claimed_node=%s detail=%s",
            problem,
            claimed.get("run_id"),
            claimed.get("node_id"),
            _text(detail, 200),
        )
        record_unverified(
            session,
            raw,
            evidence="ToolReceiptInvalid",
            problem=problem,
            payload={"problem": _text(detail, DETAIL_CAP), "claimed": claimed},
            at=now,
        )
        session.commit()
        return Ingested(Outcome.RECEIPT_INVALID)

    if contains_nul(raw):
        return unverified("nul", "message contains NUL characters, which the ledger cannot store")
    try:
        message: ResultMessage = check_result_message(raw, keys, received=now)
    except ReceiptProblem as e:
        return unverified(e.kind, e.message)
    # Verified: signed by a key of ``tool.<result.tool>``, trusted now. Bind it by the
    # digest of the envelope it names to the attempt dispatched with that digest.
    result = message.result
    body = message.model_dump(mode="json")
    where = _dispatched_to(session, result.envelope_sha256)
    state = lock_run(session, where[0]) if where is not None else None
    node = state.nodes.get(where[1]) if state is not None and where is not None else None
    dispatched = (
        session.get(Attempt, (node.run_id, node.node_id, where[2]), populate_existing=True)
        if node is not None and where is not None
        else None
    )
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
    events: list[NewEvent] = []

    def current(n: Node, number: int) -> bool:
        return n.status == NodeStatus.QUEUED and number == n.attempt

    def finish(outcome: Outcome) -> Ingested:
        append_events(session, events, at=now)
        session.commit()
        return Ingested(outcome)

    if result.kind == "refusal":
        # A worker that could not verify an envelope trusts none of its ids, but names
        # the digest of what it received: bound when that is the exact envelope we
        # dispatched to that tool.
        code = result.error.code if result.error else "envelope_invalid"
        tenant = state.run.tenant_id if bound and state is not None else None
        events.append(
            NewEvent(
                "JobRefused",
                {"bound": bound, "code": code, "message": body},
                tenant_id=tenant,
                run_id=state.run.id if bound and state is not None else None,
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
        return unverified(
            "unbound",
            "result is not bound to a dispatched envelope of its tool, run, node and attempt",
        )
    # A large result goes to the artifact store: the ledger keeps its hash and metadata.
    body, artifact = externalize_result(gov.artifacts, body, node)
    # A failure is refunded, except a call cut off at its time limit: it spent that time.
    timed_out = result.error is not None and result.error.code == "timeout"
    charged = result.duration_ms if result.ok or timed_out else 0
    if not current(node, dispatched.attempt):
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
                    **({"artifact": artifact} if artifact else {}),
                },
            )
        )
        return finish(Outcome.IGNORED)
    settle(state.run.tenant_id, dispatched.job_id, charged)
    _close_attempt(session, node, "completed" if result.ok else "failed", now)
    move_node(node, NodeStatus.COMPLETED if result.ok else NodeStatus.FAILED, now)
    node.result, node.artifact = (None, artifact) if artifact else (result.result, None)
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
                **({"artifact": artifact} if artifact else {}),
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
    """Evidence of a message that ingest failed on again and again (then acknowledged):
    on the system chain, once per distinct message, size-capped, counted as
    ``ingest_failed`` (control.orchestration.unverified)."""
    session.rollback()
    record_unverified(
        session,
        raw,
        evidence="IngestFailed",
        problem="ingest_failed",
        payload={"error": _text(f"{type(error).__name__}: {error}", DETAIL_CAP)},
        at=utc_now(),
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
