"""Tokens, freezes (the kill switch) and the policy in force, for your tenant."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status

from control.api.deps import Caller
from control.api.models import (
    ExplainIn,
    FreezeIn,
    FreezeOut,
    IssuedTokenOut,
    StatusOut,
    TokenIn,
    TokenOut,
)
from control.errors import require_text
from control.governance.auth import Role
from control.orchestration.validation import check_json
from policy.engine import PolicyRequest
from policy.labels import roots_of

router = APIRouter(prefix="/v1", tags=["governance"])

__all__ = ["router"]


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=IssuedTokenOut)
def issue_token(body: TokenIn, ops: Caller) -> IssuedTokenOut:
    """Issue a token for a principal of your tenant (admin). The token is shown once;
    `environment` binds it there (never laxer than your own token's)."""
    require_text(body.principal, field="principal", max_chars=200)
    issued = ops.issue_token(
        body.principal,
        Role(body.role),
        expires_in_s=body.expires_in_s,
        environment=body.environment,
    )
    return IssuedTokenOut(
        tenant=ops.identity.tenant_name,
        token_id=issued.token_id,
        token=issued.token,
        principal=issued.principal,
        role=issued.role.value,
        expires_at=issued.expires_at.isoformat() if issued.expires_at else None,
        environment=issued.environment,
    )


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(ops: Caller) -> list[dict[str, Any]]:
    """Your tenant's tokens (admin); never their secrets, which are not kept."""
    return ops.tokens()


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(token_id: str, ops: Caller) -> Response:
    """Revoke a token of your tenant at once (admin)."""
    ops.revoke_token(token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/freezes", response_model=list[FreezeOut])
def list_freezes(ops: Caller) -> list[dict[str, Any]]:
    """The freezes in force on your tenant."""
    return ops.freezes()


@router.post("/freeze", response_model=list[FreezeOut])
def freeze(body: FreezeIn, ops: Caller) -> list[dict[str, Any]]:
    """Kill switch: no new dispatch for your tenant (admin), or for every tenant with
    `all` (an admin of an operator tenant)."""
    ops.freeze(everything=body.all, reason=body.reason)
    return ops.freezes()


@router.post("/unfreeze", response_model=list[FreezeOut])
def unfreeze(body: FreezeIn, ops: Caller) -> list[dict[str, Any]]:
    """Lift a freeze (admin; `all`: an admin of an operator tenant)."""
    ops.unfreeze(everything=body.all, reason=body.reason)
    return ops.freezes()


@router.get("/policy", response_model=StatusOut)
def policy_status(ops: Caller) -> StatusOut:
    """The bundle in force (its version is its hash), your plan, the freezes on you, and
    the environment and classification your calls run under."""
    bundle = ops.plane.policy.bundle
    plan = bundle.plans.for_tenant(ops.identity.tenant_name)
    scope = ops.scope(None, None)
    return StatusOut(
        tenant=ops.identity.tenant_name,
        principal=ops.identity.principal,
        role=ops.identity.role.value,
        version=bundle.version,
        policies={p.id: p.mode for p in bundle.policies.values()},
        plan=None if plan is None else {"name": plan[0], **plan[1].as_dict()},
        freezes=[FreezeOut.model_validate(f) for f in ops.freezes()],
        environment=scope.environment,
        classification=scope.classification,
    )


@router.post("/policy/explain", response_model=dict[str, Any])
def explain(body: ExplainIn, ops: Caller) -> dict[str, Any]:
    """How the bundle in force decides this call for you (nothing runs; no evidence):
    the decision, the policies that decided it and their reasons. Asked as a call is
    decided: your tenant's id, the classification raised by the bundle's data labels."""
    check_json(body.args, "--arg")
    identity = ops.identity
    scope = ops.scope(body.environment, body.classification)
    engine = ops.plane.policy
    with ops.plane.sessions() as session:
        manifest = ops.plane.manifest(session, body.tool)
    decision = engine.decide(
        PolicyRequest(  # as intake asks (control/orchestration/intake.py: decide_node)
            tenant=identity.tenant_id,
            principal=identity.principal,
            role=identity.role.value,
            tool=body.tool,
            environment=scope.environment,
            classification=engine.bundle.labels.classify(
                body.tool,
                body.args,
                scope.classification,
                ops.plane.settings.classification_order,
                roots=roots_of(manifest),
            ),
            args=body.args,
            on_behalf_of=body.on_behalf_of,
        )
    )
    return decision.as_evidence()
