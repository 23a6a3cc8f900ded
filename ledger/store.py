"""Appending evidence inside the caller's transaction.

Evidence and the state change it records commit together or not at all. Each
chain's head row is locked while appending (chains in sorted order, so two
appenders never deadlock), which serialises appends per tenant only.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from sqlalchemy import insert, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from ledger.chain import GENESIS, NewEvent, chain_for, event_hash
from ledger.models import ChainHead, EvidenceEvent
from toolplane.canonical import check_json_value

__all__ = ["APPENDED", "append_events"]

APPENDED = "toolplane.appended"
"""``session.info`` key: the events this session's transaction appended, with their time,
for an observer after the commit. Kept only where an observer put a list there when the
transaction began (control.ops.metrics); elsewhere nothing is kept."""


def append_events(
    session: Session, events: list[NewEvent], *, at: datetime | None = None
) -> list[tuple[str, int]]:
    """Append ``events`` in order; returns (chain_id, seq) of each. Does not commit.

    ``at`` is the events' time (default: now). Ingest passes the time it judged a
    receipt's key at, so that verifying the ledger later judges it at that very time."""
    by_chain: dict[str, list[NewEvent]] = defaultdict(list)
    for event in events:
        check_json_value(event.payload)
        by_chain[chain_for(event.tenant_id)].append(event)
    placed: dict[int, tuple[str, int]] = {}
    now = at if at is not None else datetime.now(UTC)
    observed = session.info.get(APPENDED)
    if observed is not None:
        observed.extend((event, now) for event in events)
    for chain_id in sorted(by_chain):
        # One round trip: create the head if new, else lock it, and read it either way.
        head = pg_insert(ChainHead).values(chain_id=chain_id, seq=0, hash=GENESIS)
        seq, prev = session.execute(
            head.on_conflict_do_update(
                index_elements=["chain_id"], set_={"chain_id": head.excluded.chain_id}
            ).returning(ChainHead.seq, ChainHead.hash)
        ).one()
        rows = []
        for event in by_chain[chain_id]:
            seq += 1
            link = event_hash(
                chain_id=chain_id,
                seq=seq,
                prev_hash=prev,
                kind=event.kind,
                tenant_id=event.tenant_id,
                run_id=event.run_id,
                created_at=now,
                payload=event.payload,
            )
            rows.append(
                {
                    "chain_id": chain_id,
                    "seq": seq,
                    "tenant_id": event.tenant_id,
                    "run_id": event.run_id,
                    "kind": event.kind,
                    "payload": event.payload,
                    "created_at": now,
                    "prev_hash": prev,
                    "hash": link,
                }
            )
            placed[id(event)] = (chain_id, seq)
            prev = link
        # Core, not the ORM's bulk path: the rows are plain values, and this is hot.
        session.connection().execute(insert(EvidenceEvent.__table__), rows)
        session.execute(
            update(ChainHead).where(ChainHead.chain_id == chain_id).values(seq=seq, hash=prev)
        )
    return [placed[id(event)] for event in events]
