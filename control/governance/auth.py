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
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control.errors import AuthError, Forbidden, NotFound, UsageError
from ledger.chain import NewEvent
from ledger.models import ApiToken, Principal, Tenant
from ledger.store import append_events

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_TOKEN_LIFETIME_S = 3650 * 86400
TOKEN_PREFIX = "tp_"  # noqa: S105 - a public prefix, not a secret

__all__ = [
    "APPROVERS",
    "ADMINS",
    "SUBMITTERS",
    "Identity",
    "IssuedToken",
    "Role",
    "authenticate",
    "create_tenant",
    "issue_token",
    "list_tokens",
    "require_role",
    "revoke_token",
]


class Role(StrEnum):
    SUBMITTER = "submitter"
    """Submits runs and tool calls."""
    APPROVER = "approver"
    """Approves or rejects calls that wait for approval."""
    AUDITOR = "auditor"
    """Reads runs and verifies the ledger; changes nothing."""
    ADMIN = "admin"
    """Everything in its tenant (tokens, freezes, submitting) except approving calls."""


@dataclass(frozen=True)
class Identity:
    tenant_id: str
    tenant_name: str
    principal_id: str
    principal: str
    role: Role
    operator: bool = False  # an admin of an operator tenant may freeze every tenant
    token_id: str = ""
    token_issued_by: str | None = None  # principal id of whoever issued this token
    environment: str | None = None  # the environment an admin bound the token to


@dataclass(frozen=True)
class IssuedToken:
    token_id: str
    token: str  # shown once
    principal: str
    role: Role
    expires_at: datetime | None
    environment: str | None = None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def issue_token(
    session: Session,
    *,
    tenant_id: str,
    principal: str,
    role: Role,
    expires_in_s: int | None = None,
    issued_by: Identity | None = None,
    environment: str | None = None,
) -> IssuedToken:
    """Create (or reuse) the principal and return a new token for it (shown once)."""
    if expires_in_s is not None and not 0 < expires_in_s <= MAX_TOKEN_LIFETIME_S:
        raise UsageError("a token lives at most 3650d", field="--expires-in")
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
    expires_at = None if expires_in_s is None else now + timedelta(seconds=expires_in_s)
    token_id = _new_id("tk")
    session.add(
        ApiToken(
            id=token_id,
            principal_id=row.id,
            token_sha256=_hash(token),
            created_at=now,
            expires_at=expires_at,
            issued_by=issued_by.principal_id if issued_by else None,
            environment=environment,
        )
    )
    session.flush()
    append_events(
        session,
        [
            NewEvent(
                "TokenIssued",
                {
                    "token_id": token_id,
                    "principal": principal,
                    "role": role.value,
                    "expires_at": None if expires_at is None else expires_at.isoformat(),
                    "issued_by": issued_by.principal if issued_by else None,
                    "environment": environment,
                },
                tenant_id=tenant_id,
            )
        ],
    )
    return IssuedToken(token_id, token, principal, role, expires_at, environment)


def list_tokens(session: Session, identity: Identity) -> list[dict[str, Any]]:
    """Every token of the caller's tenant (never the secrets: those are not kept)."""
    rows = session.execute(
        select(ApiToken, Principal)
        .join(Principal, ApiToken.principal_id == Principal.id)
        .where(Principal.tenant_id == identity.tenant_id)
        .order_by(ApiToken.created_at)
    ).all()
    now = datetime.now(UTC)
    out = []
    for token, principal in rows:
        if token.revoked_at is not None:
            state = "revoked"
        elif token.expires_at is not None and token.expires_at <= now:
            state = "expired"
        else:
            state = "active"
        out.append(
            {
                "token_id": token.id,
                "principal": principal.name,
                "role": principal.role,
                "created_at": token.created_at.isoformat(),
                "expires_at": None if token.expires_at is None else token.expires_at.isoformat(),
                "revoked_at": None if token.revoked_at is None else token.revoked_at.isoformat(),
                "environment": token.environment,
                "state": state,
            }
        )
    return out


def revoke_token(session: Session, identity: Identity, token_id: str) -> None:
    """Revoke a token of the caller's tenant; another tenant's token is not found."""
    require_role(identity, ADMINS, "revoke tokens")
    found = session.execute(
        select(ApiToken, Principal)
        .join(Principal, ApiToken.principal_id == Principal.id)
        .where(ApiToken.id == token_id, Principal.tenant_id == identity.tenant_id)
        .with_for_update(of=ApiToken)
    ).one_or_none()
    if found is None:
        raise NotFound("token", token_id)
    token, principal = found
    if token.revoked_at is not None:
        raise UsageError(f"token {token_id!r} is already revoked", field="TOKEN_ID")
    token.revoked_at = datetime.now(UTC)
    append_events(
        session,
        [
            NewEvent(
                "TokenRevoked",
                {"token_id": token_id, "principal": principal.name, "by": identity.principal},
                tenant_id=identity.tenant_id,
            )
        ],
    )


def create_tenant(session: Session, name: str, *, operator: bool = False) -> tuple[Tenant, str]:
    """Create a tenant and its first admin; returns the tenant and the admin's token."""
    if not TENANT_NAME.match(name):
        raise UsageError(
            "must be 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit",
            field="NAME",
        )
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise UsageError(f"tenant {name!r} already exists", field="NAME")
    tenant = Tenant(id=_new_id("tn"), name=name, created_at=datetime.now(UTC), operator=operator)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError as e:
        raise UsageError(f"tenant {name!r} already exists", field="NAME") from e
    append_events(
        session,
        [
            NewEvent(
                "TenantCreated",
                {"tenant_id": tenant.id, "name": name, "operator": operator},
                tenant_id=tenant.id,
            )
        ],
    )
    issued = issue_token(session, tenant_id=tenant.id, principal="admin", role=Role.ADMIN)
    return tenant, issued.token


SUBMITTERS = frozenset({Role.SUBMITTER, Role.ADMIN})
APPROVERS = frozenset({Role.APPROVER})
ADMINS = frozenset({Role.ADMIN})


def require_role(identity: Identity, allowed: frozenset[Role], action: str) -> None:
    """Refuse ``action`` unless the principal has one of the ``allowed`` roles."""
    if identity.role not in allowed:
        needed = " or ".join(sorted(r.value for r in allowed))
        raise Forbidden(f"the {identity.role.value} role cannot {action} (needs {needed})")


# Built once (every request authenticates): the token's row with its principal and tenant.
_TOKENS, _PRINCIPALS, _TENANTS = ApiToken.__table__, Principal.__table__, Tenant.__table__
_BY_HASH = (
    select(
        _TOKENS.c.id,
        _TOKENS.c.revoked_at,
        _TOKENS.c.expires_at,
        _TOKENS.c.issued_by,
        _TOKENS.c.environment,
        _PRINCIPALS.c.id.label("principal_id"),
        _PRINCIPALS.c.name.label("principal"),
        _PRINCIPALS.c.role,
        _TENANTS.c.id.label("tenant_id"),
        _TENANTS.c.name.label("tenant_name"),
        _TENANTS.c.operator,
    )
    .select_from(
        _TOKENS.join(_PRINCIPALS, _TOKENS.c.principal_id == _PRINCIPALS.c.id).join(
            _TENANTS, _PRINCIPALS.c.tenant_id == _TENANTS.c.id
        )
    )
    .where(_TOKENS.c.token_sha256 == bindparam("token_sha256"))
)


def authenticate(session: Session, token: str | None) -> Identity:
    """The identity a token names, read from the database on every call (a revoked or
    expired token fails at once)."""
    if not token:
        raise AuthError("no token: set TOOLPLANE_TOKEN (see `toolplane tenant create`)")
    found = session.execute(_BY_HASH, {"token_sha256": _hash(token)}).one_or_none()
    if found is None:
        raise AuthError("TOOLPLANE_TOKEN is not a valid token")
    now = datetime.now(UTC)
    if found.revoked_at is not None:
        raise AuthError("TOOLPLANE_TOKEN was revoked")
    if found.expires_at is not None and found.expires_at <= now:
        raise AuthError("TOOLPLANE_TOKEN has expired")
    return Identity(
        tenant_id=found.tenant_id,
        tenant_name=found.tenant_name,
        principal_id=found.principal_id,
        principal=found.principal,
        role=Role(found.role),
        operator=bool(found.operator),
        token_id=found.id,
        token_issued_by=found.issued_by,
        environment=found.environment,
    )
