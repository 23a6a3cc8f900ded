"""Deciding one node: policy, then a denial, an approval request, or a dispatch.

A dispatch checks the freeze and the tenant's entitlements, signs the envelope,
records the attempt and stages the job in the outbox, all in the caller's
transaction (see :func:`dispatching`: the entitlement reservation in Redis is
cancelled if that transaction does not commit). The same code decides a run's
first nodes at submission, later nodes when their dependencies complete, a
node once approved, and a retry.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from control.errors import ServiceUnavailable, UsageError
from control.governance.entitlements import reserve_ms_for
from control.governance.freeze import active_freeze
from control.orchestration.context import Governance, Submitter, submitter_of
from control.orchestration.dispatch import (
    Staged,
    due_at_for,
    envelope_ttl_s,
    sign_envelope,
    stage_job,
)
from control.orchestration.spans import annotate, current_traceparent, traced
from control.orchestration.states import NodeStatus, move_node
from ledger.chain import NewEvent
from ledger.models import Approval, Node, Run
from policy.constraints import Constraints
from policy.engine import Decision, PolicyRequest
from policy.labels import roots_of
from toolplane import logfields
from toolplane.canonical import digest
from toolplane.messages import job_id_for, ms_to_datetime

__all__ = [
    "Governance",
    "Submitter",
    "binding_problem",
    "decide_node",
    "deny_by_policy",
    "deny_node",
    "dispatch_node",
    "dispatching",
    "submitter_of",
]


log = logging.getLogger("toolplane.intake")


@dataclass
class Dispatched:
    """What one dispatch step left to do after the commit (or to undo if it fails)."""

    outbox_ids: list[int]
    reserved: list[tuple[str, str]]  # (tenant id, job id) reserved in the entitlement store
    staged: dict[int, Staged] = field(default_factory=dict)  # outbox id -> the message


def deny_node(node: Node, code: str, message: str, now: datetime) -> None:
    """The node ends denied (its run is settled by the orchestrator)."""
    move_node(node, NodeStatus.DENIED, now)
    node.error = {"code": code, "message": message}
    node.retry_at = None


def deny_by_policy(
    node: Node,
    run: Run,
    *,
    decision_id: str,
    reason: str,
    events: list[NewEvent],
    now: datetime,
    **extra: Any,
) -> None:
    """ToolDenied, then the node denied (policy_denied)."""
    events.append(
        NewEvent(
            "ToolDenied",
            {
                "node_id": node.node_id,
                "tool": node.tool,
                "decision_id": decision_id,
                "reason": reason,
            }
            | extra,
            tenant_id=run.tenant_id,
            run_id=run.id,
        )
    )
    deny_node(node, "policy_denied", reason, now)


@traced("dispatch")
def dispatch_node(
    session: Session,
    gov: Governance,
    *,
    run: Run,
    node: Node,
    submitter: Submitter,
    decision_id: str,
    constraints: Constraints | None,
    approval_id: str | None,
    events: list[NewEvent],
    done: Dispatched,
) -> bool:
    """Freeze, entitlements, then sign and stage the node's next attempt; False if denied.

    Runs inside the caller's transaction (the caller commits, and cancels
    ``done.reserved`` if the commit fails).
    """
    now = datetime.now(UTC)
    assert node.args is not None, "a node is rendered before it is decided"

    def event(kind: str, payload: dict[str, Any]) -> NewEvent:
        return NewEvent(kind, payload, tenant_id=run.tenant_id, run_id=run.id)

    frozen = active_freeze(session, run.tenant_id)
    if frozen is not None:
        if frozen.scope == "*":  # another tenant's names are not this tenant's business
            message = f"dispatch is frozen for every tenant by an operator: {frozen.reason}"
        else:
            message = f"dispatch is frozen for this tenant by {frozen.frozen_by}: {frozen.reason}"
        deny_by_policy(
            node,
            run,
            decision_id=decision_id,
            reason=message,
            events=events,
            now=now,
            frozen=frozen.scope,
        )
        return False
    manifest = gov.manifests(session, node.tool)
    if manifest is None:
        raise UsageError(f"tool {node.tool!r} is no longer registered", field="TOOL")
    timeout_s = float(manifest["limits"]["timeout_s"])
    if constraints is not None and "timeout_s" in constraints.limits:
        timeout_s = min(timeout_s, float(constraints.limits["timeout_s"]))
    ttl = envelope_ttl_s(
        visibility_timeout=gov.visibility_timeout,
        tool_timeout_s=timeout_s,
        queue_wait_s=gov.queue_wait_s,
    )
    attempt = node.attempt + 1
    job_id = job_id_for(run.id, node.node_id, attempt)
    planned = gov.engine.bundle.plans.for_tenant(submitter.tenant_name)
    if planned is not None:
        plan_name, plan = planned
        store = gov.entitlements
        if store is None:
            raise ServiceUnavailable(
                "entitlement store",
                f"tenant {submitter.tenant_name!r} has the plan {plan_name!r}, and enforcing it "
                "needs Redis: set TOOLPLANE_REDIS_URL (or use a Redis broker)",
            )
        exceeded = store.reserve(
            tenant_id=run.tenant_id,
            plan=plan,
            tool=node.tool,
            job_id=job_id,
            run_id=run.id,
            reserve_ms=reserve_ms_for(timeout_s),
            stale_s=ttl,
        )
        if exceeded is not None:
            events.append(
                event(
                    "EntitlementDenied",
                    {"node_id": node.node_id, "tool": node.tool, "plan": plan_name}
                    | exceeded.as_dict(),
                )
            )
            deny_node(node, "entitlement_exceeded", exceeded.message, now)
            return False
        done.reserved.append((run.tenant_id, job_id))
    signed = sign_envelope(
        signer=gov.signer,
        run_id=run.id,
        node_id=node.node_id,
        attempt=attempt,
        tenant=run.tenant_id,
        principal=submitter.principal,
        on_behalf_of=run.on_behalf_of,
        tool=node.tool,
        args=node.args,
        decision_id=decision_id,
        policy_version=gov.engine.version,
        approval_id=approval_id,
        ttl_s=ttl,
        limits=constraints.limits if constraints else None,
        egress=(
            list(constraints.egress)
            if constraints is not None and constraints.egress is not None
            else None
        ),
        private_egress=list(constraints.private_egress) if constraints else None,
        traceparent=current_traceparent(),  # this dispatch span: the worker's parent
    )
    expires = ms_to_datetime(signed.envelope.expires_at)
    due = due_at_for(expires, tool_timeout_s=timeout_s)
    move_node(node, NodeStatus.QUEUED, now)
    node.attempt = attempt
    node.envelope = signed.model_dump(mode="json")
    node.envelope_sha256 = signed.digest
    node.due_at = due
    node.retry_at = None
    node.max_attempts = max_attempts(manifest)
    outbox_id, staged = stage_job(
        session, signed, dispatched_at=now, expires_at=expires, due_at=due
    )
    events.append(
        event(
            "ToolCallDispatched",
            {
                "node_id": node.node_id,
                "attempt": attempt,
                "job_id": signed.envelope.job_id,
                "tool": node.tool,
                "approval_id": approval_id,
                "envelope_sha256": signed.digest,
                "due_at": due.isoformat(),
                "envelope": signed.model_dump(mode="json"),
            },
        )
    )
    session.flush()
    done.outbox_ids.append(outbox_id)
    done.staged[outbox_id] = staged
    ids = {"run_id": run.id, "node_id": node.node_id, "job_id": signed.envelope.job_id}
    with logfields.bound(**ids, tenant=run.tenant_id):
        log.info("job.dispatched tool=%s attempt=%s", node.tool, attempt)
    return True


def max_attempts(manifest: dict[str, Any]) -> int:
    """How many attempts a node of this tool gets when one is lost: more only if retry-safe."""
    if manifest.get("read_only") is not True:
        return 1
    declared = manifest.get("max_attempts", 3)
    return declared if isinstance(declared, int) and 1 <= declared <= 10 else 3


@contextmanager
def dispatching(session: Session, gov: Governance) -> Iterator[Dispatched]:
    """The transaction of one or more dispatches; commits at the end.

    If anything fails before the commit, or the commit is refused, the
    entitlement reservations made inside are cancelled. If the connection is lost
    during the commit, whether it committed is unknown: the reservations stay (a
    call may be counted without running; none runs uncounted).
    """
    done = Dispatched([], [])
    try:
        yield done
    except BaseException:
        session.rollback()
        _cancel(gov, done)
        raise
    try:
        session.commit()
    except (OperationalError, InterfaceError):
        session.rollback()
        raise
    except BaseException:
        session.rollback()
        _cancel(gov, done)
        raise


def _cancel(gov: Governance, done: Dispatched) -> None:
    if not done.reserved:
        return
    store = gov.entitlements
    for tenant_id, job_id in done.reserved:
        try:
            assert store is not None
            store.cancel(tenant_id=tenant_id, job_id=job_id)
        except Exception:  # the reservation stays: it errs towards refusing
            log.warning("entitlement.cancel_failed job=%s", job_id, exc_info=True)


def request_approval(
    session: Session,
    *,
    submitter: Submitter,
    run: Run,
    node: Node,
    decision: Decision,
    events: list[NewEvent],
) -> Approval:
    now = datetime.now(UTC)
    assert decision.approval_ttl_s is not None and node.args_sha256 is not None
    approval = Approval(
        id=f"ap_{uuid.uuid4().hex[:24]}",
        tenant_id=run.tenant_id,
        run_id=run.id,
        node_id=node.node_id,
        tool=node.tool,
        args_sha256=node.args_sha256,
        policy_version=decision.bundle_version,
        decision_id=decision.decision_id,
        policies=list(decision.policies),
        requested_by=submitter.principal_id,
        requested_at=now,
        expires_at=now + timedelta(seconds=decision.approval_ttl_s),
        status="pending",
    )
    session.add(approval)
    move_node(node, NodeStatus.AWAITING_APPROVAL, now)
    events.append(
        NewEvent(
            "ApprovalRequested",
            {
                "approval_id": approval.id,
                "node_id": node.node_id,
                "tool": node.tool,
                "args_sha256": node.args_sha256,
                "policy_version": decision.bundle_version,
                "decision_id": decision.decision_id,
                "policies": list(decision.policies),
                "requested_by": submitter.principal,
                "expires_at": approval.expires_at.isoformat(),
            },
            tenant_id=run.tenant_id,
            run_id=run.id,
        )
    )
    return approval


@traced("decision")
def decide_node(
    session: Session,
    gov: Governance,
    *,
    run: Run,
    node: Node,
    submitter: Submitter,
    events: list[NewEvent],
    done: Dispatched,
) -> None:
    """Decide one rendered node under the policy in force, then act on the decision.

    A retry is decided again too: a freeze or a policy change since the first
    attempt applies to it. A retry of an approved call dispatches under the same
    approval while it still binds the call and the policy version.
    """
    assert node.args is not None
    decision = gov.engine.decide(
        PolicyRequest(
            tenant=run.tenant_id,
            principal=submitter.principal,
            role=submitter.role,
            tool=node.tool,
            environment=run.environment,
            # the run's, raised by the bundle's labels on the data this call reads
            classification=gov.engine.bundle.labels.classify(
                node.tool,
                node.args,
                run.classification,
                gov.classifications,
                roots=roots_of(gov.manifests(session, node.tool)),
            ),
            workflow=run.workflow,
            args=node.args,
            on_behalf_of=run.on_behalf_of,
        )
    )
    annotate(allowed=decision.allowed, needs_approval=decision.needs_approval)
    events.append(
        NewEvent(
            "PolicyDecision",
            {"node_id": node.node_id, "attempt": node.attempt + 1, **decision.as_evidence()},
            tenant_id=run.tenant_id,
            run_id=run.id,
        )
    )

    def dispatch(decision_id: str, approval_id: str | None) -> None:
        dispatch_node(
            session,
            gov,
            run=run,
            node=node,
            submitter=submitter,
            decision_id=decision_id,
            constraints=decision.constraints,
            approval_id=approval_id,
            events=events,
            done=done,
        )

    if decision.allowed:
        dispatch(decision.decision_id, None)
    elif decision.needs_approval:
        approved = _approval_of_retry(session, run, node, decision.bundle_version)
        if approved is not None:
            dispatch(approved.decision_id, approved.id)
        elif active_freeze(session, run.tenant_id) is not None:
            # A frozen tenant gets nothing new, not even an approval request: dispatch_node
            # checks the freeze first and denies.
            dispatch(decision.decision_id, None)
        elif node.attempt > 0:
            deny_node(
                node,
                "approval_rejected",
                "this retry needs an approval that still binds the call and the policy in "
                "force, and there is none: submit the run again",
                datetime.now(UTC),
            )
        else:
            request_approval(
                session, submitter=submitter, run=run, node=node, decision=decision, events=events
            )
    else:
        deny_by_policy(
            node,
            run,
            decision_id=decision.decision_id,
            reason=decision.reason,
            events=events,
            now=datetime.now(UTC),
        )


def _approval_of_retry(
    session: Session, run: Run, node: Node, policy_version: str
) -> Approval | None:
    """The approval a lost attempt of this node ran under, if it still covers a retry."""
    if node.attempt == 0:
        return None
    approval = session.scalar(
        select(Approval).where(
            Approval.run_id == run.id,
            Approval.node_id == node.node_id,
            Approval.status == "granted",
            Approval.used_at.is_not(None),
        )
    )
    if approval is None:
        return None
    return None if binding_problem(approval, run, node, policy_version) else approval


def binding_problem(approval: Approval, run: Run, node: Node, policy_version: str) -> str | None:
    """Why ``approval`` does not cover this exact call under this policy, or None."""
    if approval.tenant_id != run.tenant_id:
        return "the approval belongs to another tenant"
    if (approval.run_id, approval.node_id) != (run.id, node.node_id):
        return "the approval was given for another call"
    if approval.tool != node.tool:
        return "the call's tool changed since the approval was requested"
    if (
        node.args is None
        or approval.args_sha256 != node.args_sha256
        or digest(node.args) != approval.args_sha256
    ):
        return "the call's arguments changed since the approval was requested"
    if approval.policy_version != policy_version:
        return (
            f"the policy changed since the approval was requested "
            f"({approval.policy_version[:12]}… -> {policy_version[:12]}…): submit the call again"
        )
    return None
