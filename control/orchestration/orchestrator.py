"""The orchestrator: drives each run's DAG through the node and run state machines.

Everything here runs inside one transaction that holds the run's row lock
(:func:`lock_run`, taken before any node's), so two results of the same run,
an approval and the sweeper never decide from stale views of each other.

- :func:`advance` renders, decides and dispatches every node whose
  dependencies completed, then :func:`settle_run` derives the run's status:
  a failing node (denied, failed, rejected, timed out) ends the run at once and
  cancels every node not yet ended; a run whose nodes all completed completes.
- :func:`sweep` (in the control process) ends or retries attempts whose result
  is overdue, and dispatches retries whose backoff has passed.
- :func:`cancel_run` stops further dispatch for a principal's run.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session, sessionmaker

from control.errors import ArtifactInvalid, Forbidden, NotFound, UsageError, require_text
from control.governance.auth import SUBMITTERS, Identity, Role, require_role
from control.governance.entitlements import EntitlementStore
from control.orchestration.artifacts import needed_results
from control.orchestration.intake import (
    Dispatched,
    Governance,
    Submitter,
    decide_node,
    dispatching,
    submitter_of,
)
from control.orchestration.states import (
    FAILING_NODE,
    TERMINAL_NODE,
    TERMINAL_RUN,
    NodeStatus,
    RunStatus,
    move_node,
    move_run,
)
from control.orchestration.validation import validate_args
from control.orchestration.workflows import TemplateError, render
from ledger.chain import NewEvent
from ledger.models import Approval, Attempt, Node, OutboxMessage, Run
from ledger.store import append_events
from toolplane.canonical import digest

log = logging.getLogger("toolplane.orchestrator")

RETRY_BASE_S = 1.0
RETRY_CAP_S = 30.0

__all__ = [
    "RunState",
    "advance",
    "cancel_run",
    "lock_run",
    "mark_ready",
    "retry_delay_s",
    "schedule_retry",
    "settle_run",
    "sweep",
]


class RunState:
    """A run and all its nodes, locked for the caller's transaction; its submitter read
    when first needed (deciding a node), in that transaction."""

    def __init__(self, run: Run, nodes: dict[str, Node], submitter: Submitter | Session) -> None:
        self.run, self.nodes, self._submitter = run, nodes, submitter

    @property
    def submitter(self) -> Submitter:
        if isinstance(self._submitter, Session):  # read now, once
            self._submitter = submitter_of(self._submitter, self.run)
        return self._submitter

    def event(self, kind: str, payload: dict[str, Any]) -> NewEvent:
        return NewEvent(kind, payload, tenant_id=self.run.tenant_id, run_id=self.run.id)


def lock_run(
    session: Session,
    run_id: str,
    *,
    tenant_id: str | None = None,
    skip_locked: bool = False,
    submitter: Submitter | None = None,
) -> RunState | None:
    """Lock the run, then its nodes (always in this order: no deadlock between results)."""
    query = select(Run).where(Run.id == run_id)
    if tenant_id is not None:
        query = query.where(Run.tenant_id == tenant_id)
    run = session.scalar(query.with_for_update(skip_locked=skip_locked))
    if run is None:
        return None
    nodes = session.scalars(
        select(Node).where(Node.run_id == run_id).order_by(Node.created_at, Node.node_id)
    ).all()
    return RunState(run, {n.node_id: n for n in nodes}, submitter or session)


def _ready(state: RunState, node: Node, now: datetime) -> bool:
    if node.status != NodeStatus.PENDING:
        return False
    if node.retry_at is not None:
        return node.retry_at <= now
    return all(state.nodes[need].status == NodeStatus.COMPLETED for need in node.needs)


def mark_ready(state: RunState, now: datetime) -> int:
    """Mark the nodes whose dependencies have all completed as due now (``retry_at``), so
    that if deciding them fails here, the sweeper decides them later. Returns how many."""
    if state.run.status in TERMINAL_RUN:
        return 0
    ready = 0
    for node in state.nodes.values():
        if node.status == NodeStatus.PENDING and node.retry_at is None and _ready(state, node, now):
            node.retry_at = now
            ready += 1
    return ready


def _render(session: Session, gov: Governance, state: RunState, node: Node) -> str | None:
    """Build the node's args from the run's inputs and the results it needs, or say why not."""
    if node.args is not None:
        return None
    try:  # a result in the artifact store is read here, and checked against its hash
        results = needed_results(gov.artifacts, state.nodes, node.needs)
        args = render(
            node.args_template or {},
            state.run.inputs or {},
            results,
            where=f"node {node.node_id}: args",
        )
        manifest = gov.manifests(session, node.tool)
        if manifest is None:
            return f"tool {node.tool!r} is not registered"
        validate_args(manifest, args)
    except (TemplateError, UsageError, ArtifactInvalid) as e:
        return str(e)
    node.args = args
    node.args_sha256 = digest(args)
    return None


def advance(
    session: Session,
    gov: Governance,
    state: RunState,
    events: list[NewEvent],
    done: Dispatched,
    *,
    now: datetime | None = None,
) -> None:
    """Decide and dispatch every ready node (in the caller's transaction), then settle."""
    now = now or datetime.now(UTC)
    if state.run.status in TERMINAL_RUN:
        return
    for node in state.nodes.values():
        if not _ready(state, node, now):
            continue
        problem = _render(session, gov, state, node)
        if problem is not None:
            move_node(node, NodeStatus.FAILED, now)
            node.error = {"code": "invalid_argument", "message": problem}
            break
        decide_node(
            session,
            gov,
            run=state.run,
            node=node,
            submitter=state.submitter,
            events=events,
            done=done,
        )
        if node.status in FAILING_NODE:
            break  # the run fails: nothing more is dispatched
    settle_run(session, state, events, now)


def _cancel_open(session: Session, state: RunState, message: str, now: datetime) -> list[str]:
    """Cancel every node that has not ended (and its pending approval, its open attempt)."""
    cancelled = []
    for node in state.nodes.values():
        if node.status in TERMINAL_NODE:
            continue
        if node.status == NodeStatus.AWAITING_APPROVAL:
            for approval in session.scalars(
                select(Approval).where(
                    Approval.run_id == state.run.id,
                    Approval.node_id == node.node_id,
                    Approval.status == "pending",
                )
            ):
                approval.status = "cancelled"
                approval.decided_at = now
                approval.reason = message
        if node.status == NodeStatus.QUEUED:
            attempt = session.get(Attempt, (state.run.id, node.node_id, node.attempt))
            if attempt is not None and attempt.status == "queued":
                attempt.status = "cancelled"
            # A job staged but not yet published never goes out (publishing skips rows
            # that are gone); one already published may still run: its result is ignored.
            session.execute(
                delete(OutboxMessage).where(
                    OutboxMessage.run_id == state.run.id,
                    OutboxMessage.node_id == node.node_id,
                    OutboxMessage.attempt == node.attempt,
                    OutboxMessage.published_at.is_(None),
                )
            )
        move_node(node, NodeStatus.CANCELLED, now)
        node.error = {"code": "cancelled", "message": message}
        node.retry_at = None
        cancelled.append(node.node_id)
    return cancelled


def settle_run(session: Session, state: RunState, events: list[NewEvent], now: datetime) -> None:
    """Derive the run's status from its nodes; end it (with evidence) when it has ended."""
    run = state.run
    if run.status in TERMINAL_RUN:
        return
    nodes = list(state.nodes.values())
    failing = [n for n in nodes if n.status in FAILING_NODE]
    if failing:
        first = failing[0]
        cancelled = _cancel_open(
            session, state, f"the run ended: node {first.node_id} {first.status}", now
        )
        denied = any(n.status == NodeStatus.DENIED for n in failing)
        move_run(run, RunStatus.DENIED if denied else RunStatus.FAILED, now)
        events.append(
            state.event(
                "RunFailed",
                {
                    "run_id": run.id,
                    "status": run.status,
                    "node_id": first.node_id,
                    "node_status": first.status,
                    "error": first.error,
                    "cancelled": cancelled,
                },
            )
        )
    elif all(n.status == NodeStatus.COMPLETED for n in nodes):
        move_run(run, RunStatus.COMPLETED, now)
        events.append(state.event("RunCompleted", {"run_id": run.id, "status": run.status}))
    elif any(n.status == NodeStatus.AWAITING_APPROVAL for n in nodes):
        move_run(run, RunStatus.AWAITING_APPROVAL, now)
    else:
        move_run(run, RunStatus.RUNNING, now)


def retry_delay_s(attempt: int) -> float:
    """Exponential backoff with jitter after the ``attempt``-th attempt was lost."""
    base = min(RETRY_BASE_S * 2 ** max(attempt - 1, 0), RETRY_CAP_S)
    return base * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not a secret


def schedule_retry(node: Node, now: datetime) -> datetime:
    """The node waits (pending) for its next attempt; returns when it is due."""
    at = now + timedelta(seconds=retry_delay_s(node.attempt))
    move_node(node, NodeStatus.PENDING, now)
    node.retry_at = at
    node.due_at = None
    return at


def cancel_run(
    session: Session, identity: Identity, run_id: str, *, reason: str | None
) -> tuple[RunState, list[str]]:
    """Stop further dispatch of a run of the caller's tenant (RunCancelled). Commits.

    Returns the run and the job ids of attempts that were in flight (to revoke).
    """
    require_role(identity, SUBMITTERS, "cancel runs")
    if reason is not None:
        require_text(reason, field="--reason")
    state = lock_run(session, run_id, tenant_id=identity.tenant_id)
    if state is None:
        raise NotFound("run", run_id)
    if identity.role != Role.ADMIN and state.run.principal_id != identity.principal_id:
        session.rollback()
        raise Forbidden(
            f"the {identity.role.value} role cannot cancel run {run_id}: another principal "
            "submitted it (only its submitter or an admin may cancel it)"
        )
    if state.run.status in TERMINAL_RUN:
        raise UsageError(f"run {run_id} already ended ({state.run.status})", field="RUN")
    now = datetime.now(UTC)
    in_flight = [
        a.job_id
        for n in state.nodes.values()
        if n.status == NodeStatus.QUEUED
        and (a := session.get(Attempt, (run_id, n.node_id, n.attempt))) is not None
    ]
    message = f"cancelled by {identity.principal}" + (f": {reason}" if reason else "")
    cancelled = _cancel_open(session, state, message, now)
    move_run(state.run, RunStatus.CANCELLED, now)
    append_events(
        session,
        [
            state.event(
                "RunCancelled",
                {
                    "run_id": run_id,
                    "by": identity.principal,
                    "token_id": identity.token_id,
                    "reason": reason,
                    "cancelled": cancelled,
                    "in_flight": in_flight,
                },
            )
        ],
    )
    session.commit()
    return state, in_flight


@dataclass(frozen=True)
class Swept:
    timed_out: int = 0
    retried: int = 0
    dispatched: int = 0
    outbox_ids: tuple[int, ...] = ()


def sweep(
    sessions: sessionmaker[Session], gov: Governance, *, time_out: bool = True, limit: int = 100
) -> Swept:
    """End or retry attempts whose result is overdue (only with ``time_out``: the caller
    knows no result waits unread); dispatch retries that are due.

    Each run is handled in its own transaction under its row lock (runs another
    process holds are skipped until the next sweep).
    """
    now = datetime.now(UTC)
    with sessions() as session:
        overdue = (
            session.execute(
                select(Node.run_id, Node.node_id)
                .where(Node.status == NodeStatus.QUEUED, Node.due_at < now)
                .order_by(Node.due_at)
                .limit(limit)
            ).all()
            if time_out
            else []
        )
        due = session.execute(
            select(Node.run_id)
            .where(Node.status == NodeStatus.PENDING, Node.retry_at <= now)
            .order_by(Node.retry_at)
            .limit(limit)
        ).all()
    timed_out = retried = dispatched = 0
    outbox: list[int] = []
    for run_id, node_id in overdue:
        try:
            with sessions() as session:
                state = lock_run(session, run_id, skip_locked=True)
                if state is None:
                    continue
                node = state.nodes[node_id]
                if node.status != NodeStatus.QUEUED or node.due_at is None or node.due_at >= now:
                    continue  # settled meanwhile
                events: list[NewEvent] = []
                if _overdue(session, state, node, events, now):
                    retried += 1
                else:
                    timed_out += 1
                with dispatching(session, gov):
                    append_events(session, events)
        except Exception:  # one run must not stop the sweep of the others
            log.exception("sweep.run_failed run=%s", run_id)
    for run_id in dict.fromkeys(r for (r,) in due):
        try:
            with sessions() as session:
                state = lock_run(session, run_id, skip_locked=True)
                if state is None:
                    continue
                events = []
                with dispatching(session, gov) as done:
                    advance(session, gov, state, events, done, now=now)
                    append_events(session, events)
                dispatched += len(done.outbox_ids)
                outbox += done.outbox_ids
        except Exception:
            log.exception("sweep.run_failed run=%s", run_id)
    return Swept(timed_out, retried, dispatched, tuple(outbox))


NEVER_SENT_REFUND_S = 86400
"""A cancelled job that never went out is refunded as if never reserved, within a day (the
counters it would give back are per day)."""


def release_reservations(
    sessions: sessionmaker[Session], store: EntitlementStore | None, *, limit: int = 200
) -> int:
    """Settle the entitlement reservations of attempts that ended without a result.

    A result settles its attempt's reservation. An attempt given up as lost, or cancelled,
    may never get one, and its reservation would stay held: its tool time charged, its job
    among the tenant's reservations. Once such an attempt's result is due and has not come,
    its reservation is settled at the whole time it reserved (the tool may have run: this
    errs towards refusing). A cancelled job that was never published is undone as if it had
    never been reserved (its call, its run's count and its time are given back). A result
    that comes later is still recorded, and settles nothing twice. Returns how many.
    """
    if store is None:
        return 0
    now = datetime.now(UTC)
    sent = (  # a cancel deletes a job's outbox row unless it was published (ix_outbox_attempt)
        select(OutboxMessage.id)
        .where(
            OutboxMessage.run_id == Attempt.run_id,
            OutboxMessage.node_id == Attempt.node_id,
            OutboxMessage.attempt == Attempt.attempt,
        )
        .exists()
    )
    never_sent = and_(
        Attempt.status == "cancelled",
        ~sent,
        Attempt.dispatched_at > now - timedelta(seconds=NEVER_SENT_REFUND_S),
    )
    with sessions() as session:
        rows = session.execute(
            select(Attempt, Run.tenant_id, never_sent)
            .join(Run, Run.id == Attempt.run_id)
            .where(
                Attempt.settled_at.is_(None),
                Attempt.status.in_(("lost", "cancelled")),
                or_(Attempt.due_at <= now, never_sent),  # else its result may still come
            )
            .order_by(Attempt.due_at)
            .limit(limit)
        ).all()
        for attempt, tenant_id, undo in rows:
            if undo:
                store.cancel(tenant_id=tenant_id, job_id=attempt.job_id)
            else:
                store.settle(tenant_id=tenant_id, job_id=attempt.job_id, charged_ms=None)
            attempt.settled_at = now
        session.commit()
    return len(rows)


def _overdue(
    session: Session, state: RunState, node: Node, events: list[NewEvent], now: datetime
) -> bool:
    """The node's attempt is lost: retry it if its tool is safe to retry and attempts remain
    (True), else the node times out and the run settles (False)."""
    attempt = session.get(Attempt, (state.run.id, node.node_id, node.attempt))
    if attempt is not None and attempt.status == "queued":
        attempt.status = "lost"
    retry = node.attempt < node.max_attempts
    retry_at = schedule_retry(node, now) if retry else None
    events.append(
        state.event(
            "NodeTimedOut",
            {
                "node_id": node.node_id,
                "attempt": node.attempt,
                "max_attempts": node.max_attempts,
                "due_at": attempt.due_at.isoformat() if attempt else None,
                "retry_at": retry_at.isoformat() if retry_at else None,
            },
        )
    )
    if retry:
        log.warning(
            "attempt.lost run=%s node=%s attempt=%s retry_at=%s",
            state.run.id,
            node.node_id,
            node.attempt,
            retry_at,
        )
        return True
    move_node(node, NodeStatus.TIMED_OUT, now)
    node.error = {
        "code": "timeout",
        "message": f"no result by {node.due_at:%Y-%m-%dT%H:%M:%SZ} "
        f"(attempt {node.attempt} of {node.max_attempts})",
    }
    node.due_at = None
    log.warning("node.timed_out run=%s node=%s", state.run.id, node.node_id)
    settle_run(session, state, events, now)
    return False
