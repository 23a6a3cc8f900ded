"""Verification of the evidence ledger: every link, every result hash, every receipt.

Names each broken event. A chain whose head row says more events exist than the
table holds is reported as truncated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger.chain import GENESIS, chain_for, event_hash
from ledger.models import ChainHead, EvidenceEvent
from ledger.receipts import ReceiptProblem, check_result_message
from toolplane.signing import KeyRing

RECEIPT_KINDS = frozenset({"ToolCallCompleted", "ToolCallFailed", "JobRefused"})

__all__ = ["Broken", "VerifyReport", "verify_ledger"]


@dataclass(frozen=True)
class Broken:
    event_id: int | None
    chain_id: str
    seq: int | None
    kind: str | None
    problem: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "chain_id": self.chain_id,
            "seq": self.seq,
            "kind": self.kind,
            "problem": self.problem,
        }


@dataclass
class VerifyReport:
    events: int = 0
    chains: int = 0
    receipts: int = 0
    broken: list[Broken] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.broken

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "chains": self.chains,
            "receipts_verified": self.receipts,
            "broken": [b.as_dict() for b in self.broken],
        }


def _rows(
    session: Session, chain_ids: list[str] | None, run_id: str | None
) -> Iterator[EvidenceEvent]:
    query = select(EvidenceEvent).order_by(EvidenceEvent.chain_id, EvidenceEvent.seq)
    if chain_ids is not None:
        query = query.where(EvidenceEvent.chain_id.in_(chain_ids))
    yield from session.scalars(query.execution_options(yield_per=2000))


def verify_ledger(
    session: Session,
    keys: KeyRing,
    *,
    tenant_id: str | None = None,
    run_id: str | None = None,
) -> VerifyReport:
    """Verify one tenant's chain (or every chain); ``run_id`` limits which events are named."""
    chain_ids = None if tenant_id is None else [chain_for(tenant_id)]
    report = VerifyReport()
    heads = {
        h.chain_id: h
        for h in session.scalars(
            select(ChainHead)
            if chain_ids is None
            else select(ChainHead).where(ChainHead.chain_id.in_(chain_ids))
        )
    }
    current: str | None = None
    seen: set[str] = set()
    prev_hash = GENESIS
    expected_seq = 1

    def close_chain(chain_id: str, last_seq: int, last_hash: str) -> None:
        head = heads.get(chain_id)
        if head is None:
            report.broken.append(Broken(None, chain_id, None, None, "chain has no head record"))
        elif head.seq != last_seq or head.hash != last_hash:
            report.broken.append(
                Broken(
                    None,
                    chain_id,
                    head.seq,
                    None,
                    f"chain truncated or rewritten: head {head.seq}, table ends at {last_seq}",
                )
            )

    for row in _rows(session, chain_ids, run_id):
        if row.chain_id != current:
            if current is not None:
                close_chain(current, expected_seq - 1, prev_hash)
            current, prev_hash, expected_seq = row.chain_id, GENESIS, 1
            seen.add(current)
            report.chains += 1
        report.events += 1
        named = run_id is None or row.run_id == run_id

        def broken(problem: str, row: EvidenceEvent = row) -> None:
            report.broken.append(Broken(row.id, row.chain_id, row.seq, row.kind, problem))

        if row.seq != expected_seq:
            broken(f"sequence gap: expected seq {expected_seq}")
        if row.prev_hash != prev_hash and named:
            broken("prev_hash does not link to the previous event")
        recomputed = event_hash(
            chain_id=row.chain_id,
            seq=row.seq,
            prev_hash=row.prev_hash,
            kind=row.kind,
            tenant_id=row.tenant_id,
            run_id=row.run_id,
            created_at=row.created_at,
            payload=row.payload,
        )
        if recomputed != row.hash and named:
            broken("hash does not match the event's contents (tampered)")
        if row.kind in RECEIPT_KINDS and named and "message" in row.payload:
            try:
                check_result_message(row.payload["message"], keys)
                report.receipts += 1
            except ReceiptProblem as e:
                broken(f"receipt: {e.message}")
        prev_hash, expected_seq = row.hash, row.seq + 1
    if current is not None:
        close_chain(current, expected_seq - 1, prev_hash)
    for chain_id, head in heads.items():
        if chain_id not in seen and head.seq > 0:
            report.broken.append(
                Broken(None, chain_id, head.seq, None, "chain head has no events (all deleted)")
            )
    return report
