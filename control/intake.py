"""Run intake: validate a call, decide it under policy, and stage its job.

Everything in one transaction: the run, its node, the policy decision and its
evidence, and then one of: a denial; an approval request (the node waits); or
a dispatch, which checks the freeze and the tenant's entitlements before it
signs the envelope into the outbox. The entitlement reservation in Redis is
cancelled if the transaction does not commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from jsonschema import Draft202012Validator, validators
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from control.auth import Identity
from control.dispatch import envelope_ttl_s, sign_envelope, stage_job
from control.entitlements import EntitlementStore, reserve_ms_for
from control.errors import ServiceUnavailable, UsageError, require_text
from control.freeze import active_freeze
from control.states import NodeStatus, RunStatus
from ledger.chain import NewEvent
from ledger.models import Approval, Node, Run, ToolManifest
from ledger.store import append_events
from policy.constraints import Constraints
from policy.engine import Decision, PolicyEngine, PolicyRequest
from toolplane.canonical import CanonicalJSONError, check_json_value, contains_nul, digest
from toolplane.messages import job_id_for
from toolplane.signing import Signer

NAME_RULE = "1-40 characters of a-z, 0-9, '-' or '_'"

# JSON Schema counts 3.0 as an integer; the tools' strict models do not.
StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)

__all__ = [
    "CallRequest",
    "Governance",
    "Submitted",
    "dispatching",
    "deny_by_policy",
    "deny_node",
    "dispatch_node",
    "submit_call",
]


log = logging.getLogger("toolplane.intake")


@dataclass(frozen=True)
class CallRequest:
    tool: str
    args: dict[str, Any]
    environment: str = "dev"
    classification: str = "internal"
    idempotency_key: str | None = None
    on_behalf_of: str | None = None  # the agent or end user the principal acts for


@dataclass(frozen=True)
class Submitted:
    run_id: str
    outbox_ids: tuple[int, ...]
    created: bool  # False when the idempotency key returned an existing run


@dataclass(frozen=True)
class Governance:
    """What deciding and dispatching a call needs besides the database session."""

    engine: PolicyEngine
    signer: Signer
    visibility_timeout: int
    manifests: Callable[[Session, str], dict[str, Any] | None]
    entitlements: EntitlementStore | None  # None where no Redis is configured


@dataclass
class Dispatched:
    """What one dispatch step left to do after the commit (or to undo if it fails)."""

    outbox_ids: list[int]
    reserved: list[tuple[str, str]]  # (tenant id, job id) reserved in the entitlement store


def _check_label(value: str, field: str) -> None:
    if not (0 < len(value) <= 40) or not all(c.isalnum() or c in "-_" for c in value):
        raise UsageError(f"must be {NAME_RULE}", field=field)


def validate_args(manifest: dict[str, Any], args: dict[str, Any]) -> None:
    """Check the call's arguments against the tool's announced JSON Schema."""
    try:
        check_json_value(args)
    except CanonicalJSONError as e:
        raise UsageError(str(e), field="--arg") from e
    for key, value in args.items():
        if contains_nul(key) or contains_nul(value):
            raise UsageError("NUL characters are not accepted", field=f"--arg {key}")
    validator = StrictValidator(manifest["args_schema"])
    errors = sorted(validator.iter_errors(args), key=lambda e: list(e.path))
    if not errors:
        return
    error = errors[0]
    if error.validator == "additionalProperties":
        extra = sorted(set(args) - set(manifest["args_schema"].get("properties", {})))
        raise UsageError(
            "unexpected field: this tool takes "
            + ", ".join(sorted(manifest["args_schema"].get("properties", {}))),
            field=f"--arg {', '.join(extra)}",
        )
    field = ".".join(str(p) for p in error.path) or (
        error.message.split("'")[1] if error.validator == "required" else "args"
    )
    raise UsageError(error.message, field=f"--arg {field}")


def deny_node(
    node: Node, run: Run, code: str, message: str, events: list[NewEvent], now: datetime
) -> None:
    node.status = NodeStatus.DENIED
    node.error = {"code": code, "message": message}
    node.updated_at = now
    run.status = RunStatus.DENIED
    run.updated_at = now
    events.append(
        NewEvent("RunFailed", {"run_id": run.id, "status": "denied"}, run.tenant_id, run.id)
    )


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
    """ToolDenied, then the node and its run denied (policy_denied)."""
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
    deny_node(node, run, "policy_denied", reason, events, now)


def dispatch_node(
    session: Session,
    gov: Governance,
    *,
    run: Run,
    node: Node,
    tenant_name: str,
    principal: str,
    decision_id: str,
    constraints: Constraints | None,
    approval_id: str | None,
    events: list[NewEvent],
    done: Dispatched,
) -> bool:
    """Freeze, entitlements, then sign and stage the node's job; False if it was denied.

    Runs inside the caller's transaction (the caller commits, and cancels
    ``done.reserved`` if the commit fails).
    """
    now = datetime.now(UTC)

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
    ttl = envelope_ttl_s(visibility_timeout=gov.visibility_timeout, tool_timeout_s=timeout_s)
    attempt = node.attempt + 1
    job_id = job_id_for(run.id, node.node_id, attempt)
    planned = gov.engine.bundle.plans.for_tenant(tenant_name)
    if planned is not None:
        plan_name, plan = planned
        store = gov.entitlements
        if store is None:
            raise ServiceUnavailable(
                "entitlement store",
                f"tenant {tenant_name!r} has the plan {plan_name!r}, and enforcing it needs "
                "Redis: set TOOLPLANE_REDIS_URL (or use a Redis broker)",
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
            deny_node(node, run, "entitlement_exceeded", exceeded.message, events, now)
            return False
        done.reserved.append((run.tenant_id, job_id))
    signed = sign_envelope(
        signer=gov.signer,
        run_id=run.id,
        node_id=node.node_id,
        attempt=attempt,
        tenant=run.tenant_id,
        principal=principal,
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
    )
    node.attempt = attempt
    node.status = NodeStatus.QUEUED
    node.envelope = signed.model_dump(mode="json")
    node.envelope_sha256 = signed.digest
    node.updated_at = now
    run.status = RunStatus.RUNNING
    run.updated_at = now
    outbox = stage_job(session, signed)
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
                "envelope": signed.model_dump(mode="json"),
            },
        )
    )
    session.flush()
    done.outbox_ids.append(outbox.id)
    return True


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


def _request_approval(
    session: Session,
    *,
    identity: Identity,
    run: Run,
    node: Node,
    decision: Decision,
    events: list[NewEvent],
) -> Approval:
    now = datetime.now(UTC)
    assert decision.approval_ttl_s is not None
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
        requested_by=identity.principal_id,
        requested_at=now,
        expires_at=now + timedelta(seconds=decision.approval_ttl_s),
        status="pending",
    )
    session.add(approval)
    node.status = NodeStatus.AWAITING_APPROVAL
    run.status = RunStatus.AWAITING_APPROVAL
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
                "requested_by": identity.principal,
                "expires_at": approval.expires_at.isoformat(),
            },
            tenant_id=run.tenant_id,
            run_id=run.id,
        )
    )
    return approval


def submit_call(
    session: Session, *, identity: Identity, request: CallRequest, gov: Governance
) -> Submitted:
    """Record, decide and (if allowed) stage one tool call. Commits."""
    _check_label(request.environment, "--env")
    _check_label(request.classification, "--classification")
    if request.on_behalf_of is not None:
        require_text(request.on_behalf_of, field="--on-behalf-of", max_chars=200)
    if request.idempotency_key is not None:
        existing = session.scalar(
            select(Run).where(
                Run.tenant_id == identity.tenant_id, Run.idempotency_key == request.idempotency_key
            )
        )
        if existing is not None:
            return Submitted(existing.id, (), created=False)
    manifest = gov.manifests(session, request.tool)
    if manifest is None:
        known = ", ".join(session.scalars(select(ToolManifest.tool).order_by(ToolManifest.tool)))
        raise UsageError(f"unknown tool {request.tool!r} (known: {known or 'none'})", field="TOOL")
    validate_args(manifest, request.args)

    now = datetime.now(UTC)
    run_id = f"run_{uuid.uuid4().hex[:24]}"
    node_id = request.tool
    args_sha = digest(request.args)
    run = Run(
        id=run_id,
        tenant_id=identity.tenant_id,
        principal_id=identity.principal_id,
        workflow="call",
        status=RunStatus.RUNNING,
        environment=request.environment,
        classification=request.classification,
        idempotency_key=request.idempotency_key,
        on_behalf_of=request.on_behalf_of,
        created_at=now,
        updated_at=now,
    )
    node = Node(
        run_id=run_id,
        node_id=node_id,
        tool=request.tool,
        args=request.args,
        args_sha256=args_sha,
        status=NodeStatus.PENDING,
        attempt=0,
        created_at=now,
        updated_at=now,
    )
    session.add(run)
    session.flush()
    session.add(node)
    decision = gov.engine.decide(
        PolicyRequest(
            tenant=identity.tenant_id,
            principal=identity.principal,
            role=identity.role.value,
            tool=request.tool,
            environment=request.environment,
            classification=request.classification,
            args=request.args,
            on_behalf_of=request.on_behalf_of,
        )
    )

    def event(kind: str, payload: dict[str, Any]) -> NewEvent:
        return NewEvent(kind, payload, tenant_id=identity.tenant_id, run_id=run_id)

    events = [
        event(
            "RunSubmitted",
            {
                "run_id": run_id,
                "workflow": "call",
                "principal": identity.principal,
                "role": identity.role.value,
                "on_behalf_of": request.on_behalf_of,
                "environment": request.environment,
                "classification": request.classification,
                "idempotency_key": request.idempotency_key,
                "nodes": [{"node_id": node_id, "tool": request.tool, "args_sha256": args_sha}],
            },
        ),
        event("PolicyDecision", {"node_id": node_id, **decision.as_evidence()}),
    ]
    with dispatching(session, gov) as done:
        if decision.needs_approval and active_freeze(session, identity.tenant_id) is None:
            _request_approval(
                session, identity=identity, run=run, node=node, decision=decision, events=events
            )
        elif decision.allowed or decision.needs_approval:
            # Allowed, or waiting for an approval under a freeze: dispatch_node checks the
            # freeze first, so a frozen tenant gets nothing new, not even an approval request.
            dispatch_node(
                session,
                gov,
                run=run,
                node=node,
                tenant_name=identity.tenant_name,
                principal=identity.principal,
                decision_id=decision.decision_id,
                constraints=decision.constraints,
                approval_id=None,
                events=events,
                done=done,
            )
        else:
            deny_by_policy(
                node,
                run,
                decision_id=decision.decision_id,
                reason=decision.reason,
                events=events,
                now=now,
            )
        append_events(session, events)
    return Submitted(run_id, tuple(done.outbox_ids), created=True)
