"""Approvals: a human decision on one call, bound to exactly that call.

An approval is requested when the policy decision is ``approval_required``. It
binds the tenant, run, node, tool, the SHA-256 of the arguments and the policy
bundle's version; it is decided once, by a principal with the approver role who
is not the submitter, before it expires; and a granted approval is used by
exactly one dispatch, whose envelope (and so whose receipt) carries its id.
An approval whose call changed (arguments, tool) or whose policy changed since
it was requested is refused, and the call is denied: submit it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from control.errors import Forbidden, NotFound, UsageError, require_text
from control.governance.auth import APPROVERS, Identity, require_role
from control.ops.metrics import note_node
from control.orchestration.intake import (
    Governance,
    binding_problem,
    deny_node,
    dispatch_node,
    dispatching,
)
from control.orchestration.orchestrator import RunState, lock_run, settle_run
from control.orchestration.states import NodeStatus
from ledger.chain import NewEvent
from ledger.models import Approval, Node, Principal, Run
from ledger.store import append_events
from policy.labels import roots_of

__all__ = [
    "ApprovalRefused",
    "binding_problem",
    "Decided",
    "decide_approval",
    "expire_approvals",
    "use_approval",
    "waiting_for",
]


class ApprovalRefused(UsageError):
    """An approval that cannot be used for this call (spent, expired, or bound elsewhere)."""


@dataclass(frozen=True)
class Decided:
    run_id: str
    node_id: str
    approval_id: str
    status: str  # granted, rejected, expired or refused
    outbox_ids: tuple[int, ...]
    message: str


def use_approval(
    session: Session, approval_id: str, *, run: Run, node: Node, policy_version: str
) -> Approval:
    """Spend a granted approval on this call, once; ApprovalRefused otherwise."""
    approval = session.scalar(select(Approval).where(Approval.id == approval_id).with_for_update())
    if approval is None or approval.tenant_id != run.tenant_id:
        raise NotFound("approval", approval_id)
    if approval.status != "granted":
        raise ApprovalRefused(f"approval {approval_id} is {approval.status}, not granted")
    if approval.used_at is not None:
        raise ApprovalRefused(f"approval {approval_id} was already used at {approval.used_at}")
    problem = binding_problem(approval, run, node, policy_version)
    if problem is not None:
        raise ApprovalRefused(f"approval {approval_id}: {problem}")
    if approval.expires_at <= datetime.now(UTC):
        raise ApprovalRefused(f"approval {approval_id} expired at {approval.expires_at}")
    approval.used_at = datetime.now(UTC)
    return approval


def _locked(
    session: Session, identity: Identity, run_id: str, node_id: str
) -> tuple[RunState, Node]:
    state = lock_run(session, run_id, tenant_id=identity.tenant_id)
    node = state.nodes.get(node_id) if state is not None else None
    if state is None or node is None:  # another tenant's run is as if it did not exist
        raise NotFound("node", f"{run_id}/{node_id}")
    return state, node


def _close(
    session: Session,
    *,
    approval: Approval,
    state: RunState,
    node: Node,
    status: str,
    kind: str,
    message: str,
    identity: Identity | None,
    events: list[NewEvent],
    extra: dict[str, Any] | None = None,
) -> None:
    now = datetime.now(UTC)
    run = state.run
    approval.status = status
    approval.decided_at = now
    approval.decided_by = identity.principal_id if identity else None
    approval.reason = message
    note_node(session, node)  # the tool of the call the approval was for
    events.append(
        NewEvent(
            kind,
            {
                "approval_id": approval.id,
                "node_id": node.node_id,
                "by": identity.principal if identity else None,
                "status": status,
                "reason": message,
            }
            | (extra or {}),
            tenant_id=run.tenant_id,
            run_id=run.id,
        )
    )
    deny_node(node, "approval_rejected", message, now)
    settle_run(session, state, events, now)


def decide_approval(
    session: Session,
    identity: Identity,
    gov: Governance,
    *,
    run_id: str,
    node_id: str,
    grant: bool,
    reason: str | None,
) -> Decided:
    """Approve (and dispatch) or reject one waiting call. Commits."""
    require_role(identity, APPROVERS, "approve or reject calls")
    if not grant and not (reason and reason.strip()):
        raise UsageError("a rejection needs a reason (it is evidence)", field="--reason")
    if reason is not None:
        require_text(reason, field="--reason")
    state, node = _locked(session, identity, run_id, node_id)
    run = state.run
    approval = session.scalar(
        select(Approval)
        .where(Approval.run_id == run.id, Approval.node_id == node.node_id)
        .with_for_update()
    )
    if approval is None or node.status != NodeStatus.AWAITING_APPROVAL:
        raise UsageError(
            f"{run_id}/{node_id} is not awaiting approval (it is {node.status})", field="NODE"
        )
    if approval.status != "pending":
        raise ApprovalRefused(f"approval {approval.id} was already {approval.status}")
    if approval.requested_by == identity.principal_id:
        raise Forbidden("the submitter of a call cannot approve or reject it")
    if identity.token_issued_by == approval.requested_by:
        # An admin who submitted could mint a token for an approver and approve as them.
        raise Forbidden(
            "this token was issued by the call's submitter; a decision on the call needs "
            "a token its submitter did not issue"
        )
    events: list[NewEvent] = []
    now = datetime.now(UTC)

    def finish(status: str, kind: str, message: str, **extra: Any) -> Decided:
        _close(
            session,
            approval=approval,
            state=state,
            node=node,
            status=status,
            kind=kind,
            message=message,
            identity=identity,
            events=events,
            extra=extra,
        )
        append_events(session, events)
        session.commit()
        return Decided(run.id, node.node_id, approval.id, status, (), message)

    if approval.expires_at <= now:
        return finish(
            "expired", "ApprovalExpired", f"the approval request expired at {approval.expires_at}"
        )
    if not grant:
        return finish("rejected", "ApprovalRejected", str(reason))
    engine = gov.engine
    problem = binding_problem(approval, run, node, engine.version)
    if problem is not None:
        return finish("refused", "ApprovalRejected", problem, refused=True)

    approval.status = "granted"
    approval.decided_at = now
    approval.decided_by = identity.principal_id
    approval.reason = reason
    use_approval(session, approval.id, run=run, node=node, policy_version=engine.version)
    events.append(
        NewEvent(
            "ApprovalGranted",
            {
                "approval_id": approval.id,
                "node_id": node.node_id,
                "by": identity.principal,
                "token_id": identity.token_id,
                "reason": reason,
                "args_sha256": approval.args_sha256,
                "policy_version": approval.policy_version,
            },
            tenant_id=run.tenant_id,
            run_id=run.id,
        )
    )
    with dispatching(session, gov) as done:
        dispatched = dispatch_node(
            session,
            gov,
            run=run,
            node=node,
            submitter=state.submitter,
            decision_id=approval.decision_id,
            constraints=engine.bundle.constraints.for_call(  # at the class it was decided at
                tool=node.tool,
                environment=run.environment,
                classification=engine.bundle.labels.classify(
                    node.tool,
                    node.args or {},
                    run.classification,
                    gov.classifications,
                    roots=roots_of(gov.manifests(session, node.tool)),
                ),
            ),
            approval_id=approval.id,
            events=events,
            done=done,
        )
        settle_run(session, state, events, datetime.now(UTC))
        append_events(session, events)
    message = "dispatched" if dispatched else str((node.error or {}).get("message"))
    return Decided(run.id, node.node_id, approval.id, "granted", tuple(done.outbox_ids), message)


def expire_approvals(session: Session, *, limit: int = 100) -> int:
    """Deny every call whose approval request lapsed unanswered. Commits; returns how many."""
    now = datetime.now(UTC)
    lapsed = session.execute(
        select(Approval.run_id)
        .where(Approval.status == "pending", Approval.expires_at <= now)
        .order_by(Approval.expires_at)
        .limit(limit)
    ).all()
    events: list[NewEvent] = []
    expired = 0
    for run_id in dict.fromkeys(r for (r,) in lapsed):
        state = lock_run(session, run_id, skip_locked=True)
        if state is None:
            continue
        for approval in session.scalars(
            select(Approval)
            .where(
                Approval.run_id == run_id,
                Approval.status == "pending",
                Approval.expires_at <= now,
            )
            .with_for_update()
        ):
            node = state.nodes[approval.node_id]
            if node.status != NodeStatus.AWAITING_APPROVAL:
                continue
            expired += 1
            _close_expired(session, approval, state, node, events)
    if events:
        append_events(session, events)
    session.commit()
    return expired


def _close_expired(
    session: Session, approval: Approval, state: RunState, node: Node, events: list[NewEvent]
) -> None:
    _close(
        session,
        approval=approval,
        state=state,
        node=node,
        status="expired",
        kind="ApprovalExpired",
        message=f"the approval request expired unanswered at {approval.expires_at}",
        identity=None,
        events=events,
    )


def waiting_for(session: Session, tenant_id: str, run_id: str) -> list[dict[str, Any]]:
    """Who a run of this tenant waits for: each pending approval, its submitter and expiry."""
    rows = session.execute(
        select(Approval, Principal)
        .join(Principal, Principal.id == Approval.requested_by)
        .where(
            Approval.run_id == run_id,
            Approval.tenant_id == tenant_id,
            Approval.status == "pending",
        )
    ).all()
    return [
        {
            "approval_id": a.id,
            "node_id": a.node_id,
            "submitter": p.name,
            "policies": a.policies,
            "expires_at": a.expires_at.isoformat(),
            "who": f"a principal with the approver role other than {p.name}",
        }
        for a, p in rows
    ]
