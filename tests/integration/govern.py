"""Helpers of the governance tests: principals, custom bundles, evidence."""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select

from control.governance.auth import Role, create_tenant
from control.orchestration.operations import Operations as Client
from ledger.db import make_engine, make_sessionmaker
from ledger.models import EvidenceEvent, OutboxMessage
from tests.harness import Stack


def principal(admin: Client, stack: Stack, name: str, role: str) -> Client:
    """A client for a new principal of the admin's tenant."""
    issued = admin.issue_token(name, Role(role))
    return stack.client(issued.token)


def bundle_with(
    stack: Stack,
    where: Path,
    *,
    cedar: str = "",
    entitlements: dict[str, Any] | None = None,
) -> Path:
    """A copy of the stack's bundle, with extra policies and/or entitlement plans."""
    target = where / "bundle"
    shutil.copytree(stack.env["TOOLPLANE_POLICY_DIR"], target)
    if cedar:
        (target / "extra.cedar").write_text(cedar)
    if entitlements is not None:
        (target / "entitlements.json").write_text(json.dumps(entitlements))
    return target


def client_on(stack: Stack, token: str, bundle: Path) -> Client:
    """A client whose intake decides under ``bundle``."""
    settings = stack.settings(token).model_copy(update={"policy_dir": bundle})
    client = Client.from_env(settings)
    stack.clients.append(client)
    return client


def evidence(client: Client, run_id: str) -> list[tuple[str, dict[str, Any]]]:
    with client.plane.sessions() as session:
        rows = session.execute(
            select(EvidenceEvent.kind, EvidenceEvent.payload)
            .where(EvidenceEvent.run_id == run_id)
            .order_by(EvidenceEvent.seq)
        ).all()
    return [(k, p) for k, p in rows]


def tenant_evidence(client: Client, kind: str, *, system: bool = False) -> list[dict[str, Any]]:
    """Payloads of one kind from the client's tenant chain (or the system chain), in order."""
    chain = (
        EvidenceEvent.tenant_id.is_(None)
        if system
        else EvidenceEvent.tenant_id == client.identity.tenant_id
    )
    with client.plane.sessions() as session:
        return list(
            session.scalars(
                select(EvidenceEvent.payload)
                .where(chain, EvidenceEvent.kind == kind)
                .order_by(EvidenceEvent.id)
            )
        )


def outbox_rows(client: Client, run_id: str) -> int:
    with client.plane.sessions() as session:
        return len(
            session.scalars(select(OutboxMessage).where(OutboxMessage.run_id == run_id)).all()
        )


def operator_admin(stack: Stack) -> str:
    """The admin token of a new operator tenant (`toolplane tenant create --operator`)."""
    engine = make_engine(stack.env["TOOLPLANE_DATABASE_URL"])
    try:
        with make_sessionmaker(engine)() as session:
            _, token = create_tenant(session, f"ops-{secrets.token_hex(4)}", operator=True)
            session.commit()
    finally:
        engine.dispose()
    return token
