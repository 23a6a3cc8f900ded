"""Tenants, principals and API tokens.

Tokens are random, shown once, and stored only as their SHA-256. Every
operation on runs or the ledger starts from ``authenticate``, and everything
after it is scoped to the identity's tenant.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control.errors import AuthError, UsageError
from ledger.chain import NewEvent
from ledger.models import ApiToken, Principal, Tenant
from ledger.store import append_events

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
TOKEN_PREFIX = "tp_"  # noqa: S105 - a public prefix, not a secret

__all__ = [
    "SUBMITTERS",
    "Identity",
    "Role",
    "authenticate",
    "create_tenant",
    "issue_token",
    "require_role",
]


class Role(StrEnum):
    SUBMITTER = "submitter"
    """Submits runs and tool calls."""
    APPROVER = "approver"
    """Approves or rejects calls that wait for approval."""
    AUDITOR = "auditor"
    """Reads runs and verifies the ledger; changes nothing."""
    ADMIN = "admin"
    """Everything in its tenant, including issuing tokens."""


@dataclass(frozen=True)
class Identity:
    tenant_id: str
    tenant_name: str
    principal_id: str
    principal: str
    role: Role


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def issue_token(session: Session, *, tenant_id: str, principal: str, role: Role) -> str:
    """Create (or reuse) the principal and return a new token for it (shown once)."""
    now = datetime.now(UTC)
    row = session.scalar(
        select(Principal).where(Principal.tenant_id == tenant_id, Principal.name == principal)
    )
    if row is None:
        row = Principal(
            id=_new_id("pr"), tenant_id=tenant_id, name=principal, role=role.value, created_at=now
        )
        session.add(row)
        session.flush()
    elif row.role != role.value:
        raise UsageError(f"principal already exists with role {row.role}", field="--role")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiToken(id=_new_id("tk"), principal_id=row.id, token_sha256=_hash(token), created_at=now)
    )
    return token


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """Create a tenant and its first admin; returns the tenant and the admin's token."""
    if not TENANT_NAME.match(name):
        raise UsageError(
            "must be 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit",
            field="NAME",
        )
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise UsageError(f"tenant {name!r} already exists", field="NAME")
    tenant = Tenant(id=_new_id("tn"), name=name, created_at=datetime.now(UTC))
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError as e:
        raise UsageError(f"tenant {name!r} already exists", field="NAME") from e
    token = issue_token(session, tenant_id=tenant.id, principal="admin", role=Role.ADMIN)
    append_events(
        session,
        [NewEvent("TenantCreated", {"tenant_id": tenant.id, "name": name}, tenant_id=tenant.id)],
    )
    return tenant, token


SUBMITTERS = frozenset({Role.SUBMITTER, Role.ADMIN})


def require_role(identity: Identity, allowed: frozenset[Role], action: str) -> None:
    """Refuse ``action`` unless the principal has one of the ``allowed`` roles."""
    if identity.role not in allowed:
        needed = " or ".join(sorted(r.value for r in allowed))
        raise AuthError(f"the {identity.role.value} role cannot {action} (needs {needed})")


def authenticate(session: Session, token: str | None) -> Identity:
    if not token:
        raise AuthError("no token: set TOOLPLANE_TOKEN (see `toolplane tenant create`)")
    found = session.execute(
        select(ApiToken, Principal, Tenant)
        .join(Principal, ApiToken.principal_id == Principal.id)
        .join(Tenant, Principal.tenant_id == Tenant.id)
        .where(ApiToken.token_sha256 == _hash(token))
    ).one_or_none()
    if found is None:
        raise AuthError("TOOLPLANE_TOKEN is not a valid token")
    api_token, principal, tenant = found
    now = datetime.now(UTC)
    if api_token.revoked_at is not None:
        raise AuthError("TOOLPLANE_TOKEN was revoked")
    if api_token.expires_at is not None and api_token.expires_at <= now:
        raise AuthError("TOOLPLANE_TOKEN has expired")
    return Identity(
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        principal_id=principal.id,
        principal=principal.name,
        role=Role(principal.role),
    )
