"""Decisions under a policy bundle, failing closed.

An error while deciding (a malformed request, an evaluation error, anything
Cedar raises) is a denial with the error as its reason.

A decision is one of ``allow``, ``deny`` or ``approval_required`` (the call is
forbidden only by ``@approval`` policies, and would be permitted without them).
Where the bundle has ``@mode("log_only")`` policies, the decision also records
what it would have been had they been enforced.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import cedarpy

from policy.bundle import PolicyBundle, PolicySubset
from policy.constraints import Constraints
from toolplane.canonical import canonical_json

__all__ = ["Decision", "PolicyEngine", "PolicyRequest", "cedar_args"]

NAMESPACE = "Toolplane"
CEDAR_LONG = 2**63
ALLOW, DENY, APPROVAL = "allow", "deny", "approval_required"


def _cedar_scalar(value: Any) -> bool:
    if isinstance(value, bool | str):
        return True
    return isinstance(value, int) and -CEDAR_LONG <= value < CEDAR_LONG


def cedar_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """The call's arguments as Cedar sees them, and their lengths.

    Top-level strings, booleans and integers pass as they are; lists of them as
    sets (Cedar sets may mix those types). Anything else (floats, null, objects,
    lists holding any of them) is left out of ``args``:
    a record could smuggle Cedar's ``__entity``/``__extn`` escapes. Every
    string's and list's length is in the lengths, whatever it holds.
    """
    values: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for key, value in args.items():
        if isinstance(value, str | list):
            lengths[key] = len(value)
        if _cedar_scalar(value):
            values[key] = value
        elif isinstance(value, list) and all(_cedar_scalar(v) for v in value):
            values[key] = list(value)
    return values, lengths


@dataclass(frozen=True)
class PolicyRequest:
    tenant: str
    principal: str
    role: str
    tool: str
    environment: str
    classification: str
    workflow: str = "call"
    args: dict[str, Any] = field(default_factory=dict)
    on_behalf_of: str | None = None  # the agent or end user the principal acts for

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "principal": self.principal,
            "role": self.role,
            "on_behalf_of": self.on_behalf_of,
            "tool": self.tool,
            "environment": self.environment,
            "classification": self.classification,
            "workflow": self.workflow,
            "args": self.args,
        }


@dataclass(frozen=True)
class Decision:
    decision_id: str
    outcome: str  # allow, deny or approval_required
    policies: tuple[str, ...]  # the @ids of the policies that decided it
    errors: tuple[str, ...]
    bundle_version: str
    request: PolicyRequest
    reason: str = ""
    constraints: Constraints | None = None  # what applies to the call, when not denied
    approval_ttl_s: int | None = None  # how long an approval may take, when one is required
    log_only: dict[str, Any] | None = None  # what log-only policies would have decided

    @property
    def allowed(self) -> bool:
        return self.outcome == ALLOW

    @property
    def needs_approval(self) -> bool:
        return self.outcome == APPROVAL

    def as_evidence(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "decision": self.outcome,
            "policies": list(self.policies),
            "errors": list(self.errors),
            "reason": self.reason,
            "bundle_version": self.bundle_version,
            "request": self.request.as_dict(),
            "constraints": None if self.constraints is None else self.constraints.as_dict(),
            "approval_ttl_s": self.approval_ttl_s,
            "log_only": self.log_only,
        }


@dataclass(frozen=True)
class _Eval:
    allowed: bool
    policies: tuple[str, ...]
    errors: tuple[str, ...]


class PolicyEngine:
    """Decides tool calls under one loaded bundle (parsed once, reused for every call)."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle

    @property
    def version(self) -> str:
        return self.bundle.version

    def _cedar(self, request: PolicyRequest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        principal_uid = {
            "type": f"{NAMESPACE}::Principal",
            "id": f"{request.tenant}/{request.principal}",
        }
        tool_uid = {"type": f"{NAMESPACE}::Tool", "id": request.tool}
        args, lengths = cedar_args(request.args)
        context: dict[str, Any] = {
            "tenant": request.tenant,
            "environment": request.environment,
            "classification": request.classification,
            "workflow": request.workflow,
            "args": args,
            "arg_lengths": lengths,
            "args_bytes": len(canonical_json(request.args)),
        }
        if request.on_behalf_of is not None:
            context["on_behalf_of"] = request.on_behalf_of
        cedar_request = {
            "principal": principal_uid,
            "action": {"type": f"{NAMESPACE}::Action", "id": "call"},
            "resource": tool_uid,
            "context": context,
        }
        entities = [
            {
                "uid": principal_uid,
                "attrs": {"tenant": request.tenant, "role": request.role},
                "parents": [],
            },
            {"uid": tool_uid, "attrs": {}, "parents": []},
        ]
        return cedar_request, entities

    @staticmethod
    def _evaluate(subset: PolicySubset, request: dict[str, Any], entities: list[Any]) -> _Eval:
        # The schema validated every policy at load. Requests are not checked against
        # it here: the arguments of tools the schema does not know must still reach
        # the policies (a policy that reads a missing or mistyped one errs, and an
        # error denies).
        result = cedarpy.is_authorized(request, subset.policy_set, entities)
        errors = []
        for error in result.diagnostics.errors:
            text = str(error)
            for cedar_id, name in subset.names.items():
                text = text.replace(f"`{cedar_id}`", f"`{name}`")
            errors.append(text)
        policies = tuple(subset.names.get(p, p) for p in result.diagnostics.reasons)
        return _Eval(bool(result.allowed) and not errors, policies, tuple(errors))

    def _would(
        self,
        bundle: PolicyBundle,
        outcome: str,
        enforced: _Eval,
        request: dict[str, Any],
        entities: list[Any],
    ) -> dict[str, Any]:
        """What the decision would be with the log-only policies enforced too.

        Only the log-only policies are evaluated; Cedar's rule (a matching forbid
        denies; else a matching permit allows; else deny) and the approval rule
        combine them with the enforced result, so the whole bundle is not
        evaluated twice. Unlike Cedar, which skips a policy that errs, this engine
        denies on any error, and the would-be decision says the same.
        """
        seen = self._evaluate(bundle.log_only, request, entities)

        def approval_only(ids: list[str] | tuple[str, ...]) -> bool:
            return bool(ids) and all(bundle.policies[p].approval_s is not None for p in ids)

        forbids = [p for p in seen.policies if bundle.policies[p].effect == "forbid"]
        permits = [p for p in seen.policies if bundle.policies[p].effect == "permit"]
        if seen.errors:
            would = DENY  # an erring policy, once enforced, makes this engine deny
        elif forbids:
            # A log-only "@approval" forbid over a call that would otherwise run (or wait
            # anyway) makes it wait; any other log-only forbid denies it.
            lifted = outcome in (ALLOW, APPROVAL) and approval_only(forbids)
            would = APPROVAL if lifted else DENY
        elif outcome in (ALLOW, APPROVAL):
            would = outcome
        elif enforced.errors:
            would = DENY
        elif enforced.policies:
            # Only approval forbids deny, and nothing enforced permits: a log-only
            # permit would make the call wait for an approval.
            would = APPROVAL if permits and approval_only(enforced.policies) else DENY
        else:
            would = ALLOW if permits else DENY  # a log-only permit would allow
        return {
            "decision": would,
            "policies": list(seen.policies),
            "differs": would != outcome,
            "errors": list(seen.errors),
        }

    def decide(self, request: PolicyRequest) -> Decision:
        decision_id = str(uuid.uuid4())
        bundle = self.bundle
        try:
            cedar_request, entities = self._cedar(request)
            enforced = self._evaluate(bundle.enforced, cedar_request, entities)
            outcome = ALLOW if enforced.allowed else DENY
            approval_ttl_s = None
            approvers = tuple(
                p for p in enforced.policies if bundle.policies[p].approval_s is not None
            )
            if (
                outcome == DENY
                and not enforced.errors
                and approvers
                and len(approvers) == len(enforced.policies)
            ):
                # Forbidden only by @approval policies: would the rest permit it?
                if self._evaluate(bundle.unapproved, cedar_request, entities).allowed:
                    outcome, approval_ttl_s = APPROVAL, bundle.approval_s(approvers)
            log_only = None
            if bundle.has_log_only:
                log_only = self._would(bundle, outcome, enforced, cedar_request, entities)
        except Exception as e:  # fail closed: any error is a denial
            return Decision(
                decision_id=decision_id,
                outcome=DENY,
                policies=(),
                errors=(f"{type(e).__name__}: {e}",),
                bundle_version=self.version,
                request=request,
                reason=f"policy engine error: {e}",
            )
        policies, errors = enforced.policies, enforced.errors
        constraints = None
        if outcome != DENY:
            constraints = bundle.constraints.for_call(
                tool=request.tool,
                environment=request.environment,
                classification=request.classification,
            )
        if outcome == ALLOW:
            reason = f"permitted by {', '.join(policies)}"
        elif outcome == APPROVAL:
            reason = f"needs an approval under {', '.join(policies)}"
        elif errors:
            reason = f"policy evaluation error: {'; '.join(errors)}"
        elif policies:
            reason = f"forbidden by {', '.join(policies)}"
        else:
            where = f"{request.environment}/{request.classification}"
            reason = f"no policy permits {request.tool} in {where}"
        return Decision(
            decision_id=decision_id,
            outcome=outcome,
            policies=policies,
            errors=errors,
            bundle_version=self.version,
            request=request,
            reason=reason,
            constraints=constraints,
            approval_ttl_s=approval_ttl_s,
            log_only=log_only,
        )
