"""The ledger's tables (SQLAlchemy 2). Migrations live in ledger/migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ApiToken",
    "Approval",
    "Attempt",
    "Base",
    "ChainHead",
    "EvidenceEvent",
    "Freeze",
    "InvalidMessage",
    "InvalidMessageCount",
    "MerkleNode",
    "MerkleTree",
    "Node",
    "OutboxMessage",
    "PolicyVersion",
    "Principal",
    "Run",
    "RunEvent",
    "SigningKey",
    "Tenant",
    "ToolAnnouncement",
    "ToolApproval",
    "ToolManifest",
]

Json = JSONB
TZ = DateTime(timezone=True)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")


class Principal(Base):
    __tablename__ = "principals"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(TZ)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    expires_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    issued_by: Mapped[str | None] = mapped_column(String(40), nullable=True)  # a principal id
    environment: Mapped[str | None] = mapped_column(String(40), nullable=True)  # bound by an admin


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_runs_tenant_created", "tenant_id", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"))
    workflow: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(30))
    environment: Mapped[str] = mapped_column(String(40))
    classification: Mapped[str] = mapped_column(String(40))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    on_behalf_of: Mapped[str | None] = mapped_column(String(200), nullable=True)
    spec: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)  # the workflow
    spec_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    inputs: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    request_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)


class Node(Base):
    """One tool call of a run; its arguments are rendered when its dependencies completed."""

    __tablename__ = "nodes"
    __table_args__ = (
        Index("ix_nodes_envelope_sha256", "envelope_sha256"),
        Index("ix_nodes_status_due", "status", "due_at"),
        Index("ix_nodes_status_retry", "status", "retry_at"),
    )
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    tool: Mapped[str] = mapped_column(String(63))
    needs: Mapped[list[str]] = mapped_column(Json, default=list)
    args_template: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    args: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    args_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(30))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    due_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)  # the attempt's deadline
    retry_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)  # a retry's backoff
    envelope: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    envelope_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    result_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A result kept in the artifact store (ledger/artifacts.py): its metadata; result null.
    artifact: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    receipt: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)


class Attempt(Base):
    """One dispatch of a node: what a result must be bound to, and whether it settled."""

    __tablename__ = "attempts"
    __table_args__ = (
        Index("ix_attempts_unsettled", "due_at", postgresql_where=text("settled_at IS NULL")),
    )
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(200))
    envelope_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    dispatched_at: Mapped[datetime] = mapped_column(TZ)
    expires_at: Mapped[datetime] = mapped_column(TZ)
    due_at: Mapped[datetime] = mapped_column(TZ)
    # queued, completed, failed, rejected, refused, lost (overdue), cancelled
    status: Mapped[str] = mapped_column(String(20))
    settled_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)


class OutboxMessage(Base):
    """A job committed together with its node's state, published after commit."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_unpublished", "published_at"),
        Index("ix_outbox_attempt", "run_id", "node_id", "attempt"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(40))
    node_id: Mapped[str] = mapped_column(String(100))
    attempt: Mapped[int] = mapped_column(Integer)
    task_name: Mapped[str] = mapped_column(String(100))
    queue: Mapped[str] = mapped_column(String(100))
    body: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(TZ)
    published_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)


class Approval(Base):
    """A request for a human decision on one call, bound to its exact arguments and policy."""

    __tablename__ = "approvals"
    __table_args__ = (
        UniqueConstraint("run_id", "node_id"),
        Index("ix_approvals_tenant_status", "tenant_id", "status"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    node_id: Mapped[str] = mapped_column(String(100))
    tool: Mapped[str] = mapped_column(String(63))
    args_sha256: Mapped[str] = mapped_column(String(64))
    policy_version: Mapped[str] = mapped_column(String(64))
    decision_id: Mapped[str] = mapped_column(String(40))
    policies: Mapped[list[str]] = mapped_column(Json)
    requested_by: Mapped[str] = mapped_column(ForeignKey("principals.id"))
    requested_at: Mapped[datetime] = mapped_column(TZ)
    expires_at: Mapped[datetime] = mapped_column(TZ)
    status: Mapped[str] = mapped_column(String(20))  # pending, granted, rejected, expired
    decided_by: Mapped[str | None] = mapped_column(ForeignKey("principals.id"), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    used_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)


class Freeze(Base):
    """A kill switch in force: no new dispatch for the tenant (or for all, scope ``*``)."""

    __tablename__ = "freezes"
    scope: Mapped[str] = mapped_column(String(40), primary_key=True)
    frozen_by: Mapped[str] = mapped_column(String(250))
    reason: Mapped[str] = mapped_column(Text)
    frozen_at: Mapped[datetime] = mapped_column(TZ)


class SigningKey(Base):
    """The public half (Ed25519) of every key that signed something in the ledger, its
    window, and its revocation (never cleared once set; the earliest one is kept)."""

    __tablename__ = "signing_keys"
    key_id: Mapped[str] = mapped_column(String(120), primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    algorithm: Mapped[str] = mapped_column(String(20))
    public_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    not_before: Mapped[datetime] = mapped_column(TZ)
    not_after: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)
    revoked_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class PolicyVersion(Base):
    __tablename__ = "policy_versions"
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    files: Mapped[dict[str, Any]] = mapped_column(Json)
    loaded_at: Mapped[datetime] = mapped_column(TZ)


class ToolManifest(Base):
    """The manifest in force for a tool: a signed announcement whose digest the operator
    approved (``tool_approvals``); the control uses no other."""

    __tablename__ = "tool_manifests"
    tool: Mapped[str] = mapped_column(String(63), primary_key=True)
    version: Mapped[str] = mapped_column(String(40))
    manifest: Mapped[dict[str, Any]] = mapped_column(Json)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(120))
    registered_at: Mapped[datetime] = mapped_column(TZ)


class ToolAnnouncement(Base):
    """Each distinct manifest a worker announced for a tool (signed with the tool's key),
    approved or held; ``problem`` says why it cannot be approved, if it cannot."""

    __tablename__ = "tool_announcements"
    tool: Mapped[str] = mapped_column(String(63), primary_key=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(40))
    manifest: Mapped[dict[str, Any]] = mapped_column(Json)
    key_id: Mapped[str] = mapped_column(String(120))
    announced_at: Mapped[datetime] = mapped_column(TZ)
    problem: Mapped[str | None] = mapped_column(Text, nullable=True)


class ToolApproval(Base):
    """The operator's pin of a tool: the one manifest digest that may take effect."""

    __tablename__ = "tool_approvals"
    tool: Mapped[str] = mapped_column(String(63), primary_key=True)
    version: Mapped[str] = mapped_column(String(40))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    approved_by: Mapped[str] = mapped_column(String(250))
    via: Mapped[str] = mapped_column(String(40))
    approved_at: Mapped[datetime] = mapped_column(TZ)


class EvidenceEvent(Base):
    """Append-only and hash-chained; the database refuses UPDATE, DELETE and TRUNCATE."""

    __tablename__ = "evidence_events"
    __table_args__ = (
        UniqueConstraint("chain_id", "seq"),
        Index("ix_evidence_run", "run_id"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    chain_id: Mapped[str] = mapped_column(String(60))
    seq: Mapped[int] = mapped_column(BigInteger)
    tenant_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    kind: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(TZ)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ChainHead(Base):
    """The last link of each chain; appends lock it, so a chain never forks."""

    __tablename__ = "chain_heads"
    chain_id: Mapped[str] = mapped_column(String(60), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class RunEvent(Base):
    """A status change of a run (``node_id`` None) or of a node, written by a trigger in
    the changing transaction (migration 0006); the API's event stream reads these.

    Changes of one run are made under its lock, so their ids follow commit order."""

    __tablename__ = "run_events"
    __table_args__ = (Index("ix_run_events_run", "run_id", "id"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(40))
    node_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    status: Mapped[str] = mapped_column(String(30))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(TZ)


class InvalidMessage(Base):
    """A distinct message on ``results`` that changed nothing and was recorded once on the
    system chain (``ToolReceiptInvalid`` or ``IngestFailed``); ``seen`` counts its copies."""

    __tablename__ = "invalid_messages"
    message_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    evidence: Mapped[str] = mapped_column(String(40), primary_key=True)
    problem: Mapped[str] = mapped_column(String(40))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    first_at: Mapped[datetime] = mapped_column(TZ)
    last_at: Mapped[datetime] = mapped_column(TZ)
    seen: Mapped[int] = mapped_column(BigInteger)


class InvalidMessageCount(Base):
    """Per problem: messages received (copies included) and distinct ones recorded."""

    __tablename__ = "invalid_message_counts"
    problem: Mapped[str] = mapped_column(String(40), primary_key=True)
    received: Mapped[int] = mapped_column(BigInteger)
    recorded: Mapped[int] = mapped_column(BigInteger)
    last_at: Mapped[datetime] = mapped_column(TZ)


class MerkleNode(Base):
    """A complete subtree of a chain's Merkle tree: leaves [idx * 2**level, (idx+1) * 2**level).

    Written by the integrator (ledger/integrator.py) after the events were appended."""

    __tablename__ = "merkle_nodes"
    chain_id: Mapped[str] = mapped_column(String(60), primary_key=True)
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class MerkleTree(Base):
    """How far a chain is integrated into its tree: size, root and the last event's hash."""

    __tablename__ = "merkle_trees"
    chain_id: Mapped[str] = mapped_column(String(60), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    root: Mapped[bytes] = mapped_column(LargeBinary)
    last_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(TZ)
