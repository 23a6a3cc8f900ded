"""Run intake: validate a call, decide it under policy, and stage its job.

Everything in one transaction: the run, its node, the policy decision and its
evidence, and (when allowed) the signed envelope in the outbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jsonschema import Draft202012Validator, validators
from sqlalchemy import select
from sqlalchemy.orm import Session

from control.auth import Identity
from control.dispatch import envelope_ttl_s, sign_envelope, stage_job
from control.errors import UsageError
from control.states import NodeStatus, RunStatus
from ledger.chain import NewEvent
from ledger.models import Node, Run, ToolManifest
from ledger.store import append_events
from policy.engine import PolicyEngine, PolicyRequest
from toolplane.canonical import CanonicalJSONError, check_json_value, contains_nul, digest
from toolplane.signing import Signer

NAME_RULE = "1-40 characters of a-z, 0-9, '-' or '_'"

# JSON Schema counts 3.0 as an integer; the tools' strict models do not.
StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)

__all__ = ["CallRequest", "Submitted", "submit_call"]


@dataclass(frozen=True)
class CallRequest:
    tool: str
    args: dict[str, Any]
    environment: str = "dev"
    classification: str = "internal"
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Submitted:
    run_id: str
    outbox_ids: tuple[int, ...]
    created: bool  # False when the idempotency key returned an existing run


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


def submit_call(
    session: Session,
    *,
    identity: Identity,
    request: CallRequest,
    engine: PolicyEngine,
    signer: Signer,
    visibility_timeout: int,
    manifests: Callable[[Session, str], dict[str, Any] | None],
) -> Submitted:
    """Record, decide and (if allowed) stage one tool call. Commits."""
    _check_label(request.environment, "--env")
    _check_label(request.classification, "--classification")
    if request.idempotency_key is not None:
        existing = session.scalar(
            select(Run).where(
                Run.tenant_id == identity.tenant_id, Run.idempotency_key == request.idempotency_key
            )
        )
        if existing is not None:
            return Submitted(existing.id, (), created=False)
    manifest = manifests(session, request.tool)
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
    decision = engine.decide(
        PolicyRequest(
            tenant=identity.tenant_id,
            principal=identity.principal,
            role=identity.role.value,
            tool=request.tool,
            environment=request.environment,
            classification=request.classification,
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
                "environment": request.environment,
                "classification": request.classification,
                "idempotency_key": request.idempotency_key,
                "nodes": [{"node_id": node_id, "tool": request.tool, "args_sha256": args_sha}],
            },
        ),
        event("PolicyDecision", {"node_id": node_id, **decision.as_evidence()}),
    ]
    outbox_ids: tuple[int, ...] = ()
    if not decision.allowed:
        node.status = NodeStatus.DENIED
        node.error = {"code": "policy_denied", "message": decision.reason}
        run.status = RunStatus.DENIED
        events.append(
            event(
                "ToolDenied",
                {
                    "node_id": node_id,
                    "tool": request.tool,
                    "decision_id": decision.decision_id,
                    "reason": decision.reason,
                },
            )
        )
        events.append(event("RunFailed", {"run_id": run_id, "status": RunStatus.DENIED.value}))
    else:
        ttl = envelope_ttl_s(
            visibility_timeout=visibility_timeout,
            tool_timeout_s=float(manifest["limits"]["timeout_s"]),
        )
        signed = sign_envelope(
            signer=signer,
            run_id=run_id,
            node_id=node_id,
            attempt=1,
            tenant=identity.tenant_id,
            principal=identity.principal,
            tool=request.tool,
            args=request.args,
            decision_id=decision.decision_id,
            policy_version=decision.bundle_version,
            ttl_s=ttl,
            limits=decision.constraints.limits if decision.constraints else None,
            egress=(
                list(decision.constraints.egress)
                if decision.constraints and decision.constraints.egress is not None
                else None
            ),
        )
        node.attempt = 1
        node.status = NodeStatus.QUEUED
        node.envelope = signed.model_dump(mode="json")
        node.envelope_sha256 = signed.digest
        outbox = stage_job(session, signed)
        events.append(
            event(
                "ToolCallDispatched",
                {
                    "node_id": node_id,
                    "attempt": 1,
                    "job_id": signed.envelope.job_id,
                    "tool": request.tool,
                    "envelope_sha256": signed.digest,
                    "envelope": signed.model_dump(mode="json"),
                },
            )
        )
        session.flush()
        outbox_ids = (outbox.id,)
    append_events(session, events)
    session.commit()
    return Submitted(run_id, outbox_ids, created=True)
