"""The leaf of an evidence event: the exact bytes its chain hash covers (pure).

An event's ``hash`` is the SHA-256 (hex) of these bytes, and its Merkle leaf hash is
``SHA-256(0x00 || these bytes)`` (RFC 9162 2.1.1): the RFC 8785 canonical JSON of
``{chain_id, seq, prev_hash, kind, tenant_id, run_id, created_at, payload}``, with
``created_at`` as ISO 8601 in UTC with microseconds (``2026-12-07T18:00:00.123456+00:00``).
``ledger.chain.event_hash`` hashes the same object; a unit test holds the two equal.
"""

from __future__ import annotations

from typing import Any

from ledger.chain import chain_object
from toolplane.canonical import canonical_json

__all__ = ["LEAF_FIELDS", "event_leaf", "leaf_object"]

LEAF_FIELDS = (
    "chain_id",
    "seq",
    "prev_hash",
    "kind",
    "tenant_id",
    "run_id",
    "created_at",
    "payload",
)


leaf_object = chain_object  # the leaf is exactly what the chain hash covers


def event_leaf(**fields: Any) -> bytes:
    """The leaf bytes of an event given its columns (as ``leaf_object`` takes them)."""
    return canonical_json(leaf_object(**fields))
