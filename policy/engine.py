"""Decisions under a policy bundle, failing closed.

An error while deciding (a malformed request, an evaluation error, anything
Cedar raises) is a denial with the error as its reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import cedarpy

from policy.bundle import PolicyBundle
from policy.constraints import Constraints

__all__ = ["Decision", "PolicyEngine", "PolicyRequest"]

NAMESPACE = "Toolplane"


@dataclass(frozen=True)
class PolicyRequest:
    tenant: str
    principal: str
    role: str
    tool: str
    environment: str
    classification: str
    workflow: str = "call"

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "principal": self.principal,
            "role": self.role,
            "tool": self.tool,
            "environment": self.environment,
            "classification": self.classification,
            "workflow": self.workflow,
        }


@dataclass(frozen=True)
class Decision:
    decision_id: str
    allowed: bool
    policies: tuple[str, ...]  # the @ids of the policies that decided it
    errors: tuple[str, ...]
    bundle_version: str
    request: PolicyRequest
    reason: str = field(default="")
    constraints: Constraints | None = None  # what applies to the call, when allowed

    def as_evidence(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "decision": "allow" if self.allowed else "deny",
            "policies": list(self.policies),
            "errors": list(self.errors),
            "reason": self.reason,
            "bundle_version": self.bundle_version,
            "request": self.request.as_dict(),
            "constraints": None if self.constraints is None else self.constraints.as_dict(),
        }


class PolicyEngine:
    """Decides tool calls under one loaded bundle (parsed once, reused for every call)."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle

    @property
    def version(self) -> str:
        return self.bundle.version

    def decide(self, request: PolicyRequest) -> Decision:
        decision_id = str(uuid.uuid4())
        principal_uid = {
            "type": f"{NAMESPACE}::Principal",
            "id": f"{request.tenant}/{request.principal}",
        }
        tool_uid = {"type": f"{NAMESPACE}::Tool", "id": request.tool}
        cedar_request = {
            "principal": principal_uid,
            "action": {"type": f"{NAMESPACE}::Action", "id": "call"},
            "resource": tool_uid,
            "context": {
                "tenant": request.tenant,
                "environment": request.environment,
                "classification": request.classification,
                "workflow": request.workflow,
            },
        }
        entities = [
            {
                "uid": principal_uid,
                "attrs": {"tenant": request.tenant, "role": request.role},
                "parents": [],
            },
            {"uid": tool_uid, "attrs": {}, "parents": []},
        ]
        try:
            result = cedarpy.is_authorized(
                cedar_request, self.bundle.policy_set, entities, schema=self.bundle.schema
            )
            errors = tuple(str(e) for e in result.diagnostics.errors)
            policies = tuple(self.bundle.policy_names.get(p, p) for p in result.diagnostics.reasons)
            allowed = bool(result.allowed) and not errors
        except Exception as e:  # fail closed: any error is a denial
            return Decision(
                decision_id=decision_id,
                allowed=False,
                policies=(),
                errors=(f"{type(e).__name__}: {e}",),
                bundle_version=self.version,
                request=request,
                reason=f"policy engine error: {e}",
            )
        constraints = None
        if allowed:
            reason = f"permitted by {', '.join(policies)}"
            constraints = self.bundle.constraints.for_call(
                tool=request.tool,
                environment=request.environment,
                classification=request.classification,
            )
        elif errors:
            reason = f"policy evaluation error: {'; '.join(errors)}"
        elif policies:
            reason = f"forbidden by {', '.join(policies)}"
        else:
            where = f"{request.environment}/{request.classification}"
            reason = f"no policy permits {request.tool} in {where}"
        return Decision(
            decision_id=decision_id,
            allowed=allowed,
            policies=policies,
            errors=errors,
            bundle_version=self.version,
            request=request,
            reason=reason,
            constraints=constraints,
        )
