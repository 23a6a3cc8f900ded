"""What ingest keeps of a message it cannot trust: recorded once, size-capped, counted.

Whoever can push onto ``results`` (any tool's workers may) can send anything there. A
message whose receipt does not verify, or whose verified envelope digest is not the one
dispatched for its attempt, changes nothing (control.orchestration.ingest); what it
claims is not evidence about any run or tenant. So it is recorded:

- on the system chain (no tenant id, no run id), never in a tenant's chain under the
  names the sender chose;
- once: keyed by the SHA-256 of its content and the evidence kind, so that a replayed
  copy is counted but adds no event;
- size-capped: the whole message when its canonical JSON is at most ``MESSAGE_CAP``
  bytes, else its first ``MESSAGE_CAP`` bytes, always with its size and digest;
- counted per problem (``invalid_message_counts``), in the same transaction, for the
  operator (``toolplane ledger unverified``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from ledger.chain import NewEvent
from ledger.models import InvalidMessage, InvalidMessageCount
from ledger.store import append_events
from toolplane.canonical import CanonicalJSONError, canonical_json, contains_nul

__all__ = ["MESSAGE_CAP", "Kept", "ProblemCount", "counts", "keep", "record_unverified"]

MESSAGE_CAP = 4096
"""Bytes of an unverified message kept in its event. A genuine result message's header
(ids, digests, tool, worker, times, a receipt with its signature) is about 1 KB of
canonical JSON: 4 KB keeps a forged one whole with the start of its result, while a
result may be up to its tool's output cap (1 MB by default), which a sender could make
every distinct message carry into the system chain."""

DETAIL_CAP = 1000
"""Characters of the problem's text kept (a validation message quotes what it got)."""


@dataclass(frozen=True)
class Kept:
    """What is kept of a message: its content digest, its size, and at most
    ``MESSAGE_CAP`` bytes of it (itself, or ``{"head": ..., "truncated": ...}``)."""

    sha256: str
    size: int
    message: Any


def keep(raw: Any) -> Kept:
    """Digest, size and a capped view of ``raw`` (as decoded from the broker)."""
    whole = True
    try:
        data = canonical_json(raw)
    except (CanonicalJSONError, RecursionError, ValueError, TypeError):
        whole = False  # not JSON the ledger can carry: its repr (which escapes NUL)
        data = repr(raw).encode("utf-8", "backslashreplace")
    sha = hashlib.sha256(data).hexdigest()
    if whole and len(data) <= MESSAGE_CAP and not contains_nul(raw):
        return Kept(sha, len(data), raw)
    # Canonical JSON escapes control characters (NUL included): its text stores as is.
    head = data[:MESSAGE_CAP].decode("utf-8", "ignore")
    return Kept(sha, len(data), {"head": head, "truncated": len(data) > MESSAGE_CAP})


def record_unverified(
    session: Session,
    raw: Any,
    *,
    evidence: str,
    problem: str,
    payload: dict[str, Any],
    at: datetime,
) -> bool:
    """Count ``raw`` under ``problem``; record it as ``evidence`` on the system chain
    unless the same message was recorded so before. Returns whether it was recorded.
    Does not commit. ``payload``: what the event says besides the message."""
    kept = keep(raw)
    table = InvalidMessage.__table__
    seen = session.execute(
        pg_insert(InvalidMessage)
        .values(
            message_sha256=kept.sha256,
            evidence=evidence,
            problem=problem,
            size_bytes=kept.size,
            first_at=at,
            last_at=at,
            seen=1,
        )
        .on_conflict_do_update(
            index_elements=["message_sha256", "evidence"],
            set_={"seen": table.c.seen + 1, "last_at": at},
        )
        .returning(InvalidMessage.seen)
    ).scalar_one()
    new = seen == 1
    counter = InvalidMessageCount.__table__
    session.execute(
        pg_insert(InvalidMessageCount)
        .values(problem=problem, received=1, recorded=int(new), last_at=at)
        .on_conflict_do_update(
            index_elements=["problem"],
            set_={
                "received": counter.c.received + 1,
                "recorded": counter.c.recorded + int(new),
                "last_at": at,
            },
        )
    )
    if new:
        body = {
            **payload,
            "kind": problem,
            "message_sha256": kept.sha256,
            "message_bytes": kept.size,
            "message": kept.message,
        }
        append_events(session, [NewEvent(evidence, body)], at=at)
    return new


@dataclass(frozen=True)
class ProblemCount:
    problem: str
    received: int
    recorded: int
    last_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "received": self.received,
            "recorded": self.recorded,
            "last_at": self.last_at.isoformat(),
        }


def counts(session: Session) -> list[ProblemCount]:
    """Every problem counted so far, by name."""
    rows = session.scalars(select(InvalidMessageCount).order_by(InvalidMessageCount.problem))
    return [ProblemCount(r.problem, r.received, r.recorded, r.last_at) for r in rows]
