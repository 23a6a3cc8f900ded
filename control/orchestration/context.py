"""Who a node is decided for, and what deciding it needs besides the database session."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from control.governance.auth import Identity
from control.governance.entitlements import EntitlementStore
from control.orchestration.artifacts import Artifacts
from ledger.models import Principal, Run, Tenant
from policy.engine import PolicyEngine
from toolplane.signing import Signer

__all__ = ["Governance", "Submitter", "submitter_of"]


@dataclass(frozen=True)
class Submitter:
    """Whose call a node is: every node of a run is decided as its submitter's."""

    tenant_id: str
    tenant_name: str
    principal_id: str
    principal: str
    role: str

    @classmethod
    def of(cls, identity: Identity) -> Submitter:
        return cls(
            identity.tenant_id,
            identity.tenant_name,
            identity.principal_id,
            identity.principal,
            identity.role.value,
        )


def submitter_of(session: Session, run: Run) -> Submitter:
    """The run's submitter as they are now (a role changed since counts from now on)."""
    principal, tenant = session.execute(
        select(Principal, Tenant)
        .join(Tenant, Tenant.id == Principal.tenant_id)
        .where(Principal.id == run.principal_id)
    ).one()
    return Submitter(tenant.id, tenant.name, principal.id, principal.name, principal.role)


@dataclass(frozen=True)
class Governance:
    """What deciding and dispatching a call needs besides the database session."""

    engine: PolicyEngine
    signer: Signer
    visibility_timeout: int
    queue_wait_s: int
    manifests: Callable[[Session, str], dict[str, Any] | None]
    entitlements: EntitlementStore | None  # None where no Redis is configured
    classifications: tuple[str, ...] = ("public", "internal", "confidential", "restricted")
    artifacts: Artifacts | None = None  # where large results go (None: all stay inline)
