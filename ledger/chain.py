"""Hash chaining of evidence events (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from toolplane.canonical import digest

GENESIS = "0" * 64
SYSTEM_CHAIN = "system"

EVIDENCE_KINDS = frozenset(
    {
        "RunSubmitted",
        "PolicyDecision",
        "ToolDenied",
        "EntitlementDenied",
        "ApprovalRequested",
        "ApprovalGranted",
        "ApprovalRejected",
        "ApprovalExpired",
        "ToolCallPlanned",
        "ToolCallDispatched",
        "ToolCallCompleted",
        "ToolCallFailed",
        "ToolReceiptInvalid",
        "JobRefused",
        "NodeTimedOut",
        "ResultIgnored",
        "IngestFailed",
        "RunCompleted",
        "RunFailed",
        "RunCancelled",
        # Operations on the ledger itself.
        "PolicyVersionLoaded",
        "PolicyBundleRefused",
        "PolicyFrozen",
        "PolicyUnfrozen",
        "ToolRegistered",
        "ToolManifestHeld",
        "ToolApproved",
        "TenantCreated",
        "TokenIssued",
        "TokenRevoked",
        "KeyRevoked",
    }
)

__all__ = [
    "EVIDENCE_KINDS",
    "GENESIS",
    "SYSTEM_CHAIN",
    "NewEvent",
    "chain_for",
    "chain_object",
    "event_hash",
]


def chain_for(tenant_id: str | None) -> str:
    """Each tenant has its own chain; events of no tenant go to the system chain."""
    return f"tenant:{tenant_id}" if tenant_id else SYSTEM_CHAIN


@dataclass(frozen=True)
class NewEvent:
    kind: str
    payload: dict[str, Any]
    tenant_id: str | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVIDENCE_KINDS:
            raise ValueError(f"unknown evidence kind {self.kind!r}")


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def chain_object(
    *,
    chain_id: str,
    seq: int,
    prev_hash: str,
    kind: str,
    tenant_id: str | None,
    run_id: str | None,
    created_at: datetime,
    payload: dict[str, Any],
) -> dict[str, Any]:
    """What an event's chain hash covers (canonical JSON of this object: the Merkle leaf)."""
    return {
        "chain_id": chain_id,
        "seq": seq,
        "prev_hash": prev_hash,
        "kind": kind,
        "tenant_id": tenant_id,
        "run_id": run_id,
        "created_at": iso(created_at),
        "payload": payload,
    }


def event_hash(**fields: Any) -> str:
    """The chain hash of an event given its columns (as :func:`chain_object` takes them)."""
    return digest(chain_object(**fields))
