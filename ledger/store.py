"""Appending evidence inside the caller's transaction.

Evidence and the state change it records commit together or not at all. Each
chain's head row is locked while appending (chains in sorted order, so two
appenders never deadlock), which serialises appends per tenant only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, bindparam, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from ledger.chain import GENESIS, NewEvent, chain_for, event_hash
from ledger.models import ChainHead
from toolplane.canonical import check_json_value

__all__ = ["APPENDED", "append_events"]

APPENDED = "toolplane.appended"
"""``session.info`` key: the events this session's transaction appended, with their time,
for an observer after the commit. Kept only where an observer put a list there when the
transaction began (control.ops.metrics); elsewhere nothing is kept."""


# Evidence of one chain inserted from arrays (one statement text for any number of rows),
# in their order, and the chain's head moved to the last of them: one round trip.
_APPEND = text(
    "WITH appended AS ("
    " INSERT INTO evidence_events"
    " (chain_id, seq, tenant_id, run_id, kind, payload, created_at, prev_hash, hash)"
    " SELECT :chain_id, e.seq, e.tenant_id, e.run_id, e.kind, e.payload, :created_at,"
    " e.prev_hash, e.hash"
    " FROM unnest(CAST(:seqs AS bigint[]), CAST(:tenant_ids AS varchar[]),"
    " CAST(:run_ids AS varchar[]), CAST(:kinds AS varchar[]), CAST(:payloads AS jsonb[]),"
    " CAST(:prev_hashes AS varchar[]), CAST(:hashes AS varchar[]))"
    " WITH ORDINALITY AS e(seq, tenant_id, run_id, kind, payload, prev_hash, hash, n)"
    " ORDER BY e.n"
    ")"
    " UPDATE chain_heads SET seq = :seq, hash = :hash WHERE chain_id = :chain_id"
).bindparams(bindparam("created_at", type_=DateTime(timezone=True)))


def _columns(chain_id: str, rows: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    return {
        "chain_id": chain_id,
        "created_at": now,
        "seqs": [r["seq"] for r in rows],
        "tenant_ids": [r["tenant_id"] for r in rows],
        "run_ids": [r["run_id"] for r in rows],
        "kinds": [r["kind"] for r in rows],
        # as SQLAlchemy's JSONB type writes them (json.dumps); the hash is over the
        # canonical form, computed above, and JSONB keeps the values, not the text
        "payloads": [json.dumps(r["payload"]) for r in rows],
        "prev_hashes": [r["prev_hash"] for r in rows],
        "hashes": [r["hash"] for r in rows],
    }


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
        # The rows and the head's new value in one statement (the head is locked above).
        connection = session.connection()
        connection.execute(_APPEND, _columns(chain_id, rows, now) | {"seq": seq, "hash": prev})
    return [placed[id(event)] for event in events]
