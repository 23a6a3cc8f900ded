"""Each chain's Merkle tree in PostgreSQL: the integrator and the proofs it serves.

The integrator is the sequencer/integrator split of transparency logs: appends
(ledger/store.py) only chain events; afterwards, ``integrate`` reads the events
past the integrated size, checks each one's link and hash, and stores the complete
subtrees that the new leaves finish (``merkle_nodes``), then moves ``merkle_trees``.
It takes the chain's ``merkle_trees`` row lock, so two integrators never interleave,
and it reads only the new events and the O(log n) subtrees on the tree's right edge.

Roots and proofs read only the subtrees they need, in one query.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from ledger.chain import GENESIS
from ledger.errors import LedgerError
from ledger.leaf import event_leaf
from ledger.merkle import (
    EMPTY_ROOT,
    NodeSource,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    needed_nodes,
    node_hash,
    tree_root,
)
from ledger.models import EvidenceEvent, MerkleNode, MerkleTree
from ledger.roots import compact_root

__all__ = ["IntegrationError", "TreeState", "integrate", "prove_consistency", "prove_inclusion"]

log = logging.getLogger("toolplane.ledger.tree")
BATCH = 2000


class IntegrationError(LedgerError):
    """The chain past the integrated size does not link or hash: nothing is integrated."""

    def __init__(self, chain_id: str, seq: int, problem: str) -> None:
        super().__init__(f"{chain_id} seq {seq}: {problem}")
        self.chain_id, self.seq, self.problem = chain_id, seq, problem


@dataclass(frozen=True)
class TreeState:
    chain_id: str
    size: int
    root: bytes
    last_hash: str


def frontier(size: int) -> list[tuple[int, int]]:
    """The complete subtrees a tree of ``size`` leaves is made of, largest first."""
    return [(lv, (size >> lv) - 1) for lv in range(size.bit_length() - 1, -1, -1) if size >> lv & 1]


def _fetch(
    session: Session, chain_id: str, keys: set[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    if not keys:
        return {}
    rows = session.execute(
        select(MerkleNode.level, MerkleNode.idx, MerkleNode.hash).where(
            MerkleNode.chain_id == chain_id,
            tuple_(MerkleNode.level, MerkleNode.idx).in_(sorted(keys)),
        )
    ).all()
    return {(lv, i): bytes(h) for lv, i, h in rows}


def _locked_state(session: Session, chain_id: str) -> TreeState:
    session.execute(
        pg_insert(MerkleTree)
        .values(
            chain_id=chain_id,
            size=0,
            root=EMPTY_ROOT,
            last_hash=GENESIS,
            updated_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing(index_elements=["chain_id"])
    )
    row = session.execute(
        select(MerkleTree).where(MerkleTree.chain_id == chain_id).with_for_update()
    ).scalar_one()
    return TreeState(chain_id, row.size, bytes(row.root), row.last_hash)


def state(session: Session, chain_id: str) -> TreeState:
    """The chain's integrated size and root (size 0 if never integrated)."""
    row = session.get(MerkleTree, chain_id)
    if row is None:
        return TreeState(chain_id, 0, EMPTY_ROOT, GENESIS)
    return TreeState(chain_id, row.size, bytes(row.root), row.last_hash)


def integrate(session: Session, chain_id: str, *, limit: int = 100_000) -> TreeState:
    """Take up to ``limit`` events past the integrated size into the tree. Commits nothing.

    Raises IntegrationError naming the first event that does not link to the last one
    integrated or whose hash does not match its leaf."""
    current = _locked_state(session, chain_id)
    size, last_hash = current.size, current.last_hash
    edge = _fetch(session, chain_id, set(frontier(size)))
    if len(edge) != len(frontier(size)):
        raise IntegrationError(chain_id, size, "stored subtrees of the integrated tree are missing")
    taken = 0
    t = EvidenceEvent
    while taken < limit:
        rows = session.execute(
            select(
                t.seq, t.prev_hash, t.kind, t.tenant_id, t.run_id, t.created_at, t.payload, t.hash
            )
            .where(t.chain_id == chain_id, t.seq > size)
            .order_by(t.seq)
            .limit(min(BATCH, limit - taken))
        ).all()
        if not rows:
            break
        new: dict[tuple[int, int], bytes] = {}
        for seq, prev_hash, kind, tenant_id, run_id, created_at, payload, row_hash in rows:
            if seq != size + 1:
                raise IntegrationError(chain_id, seq, f"sequence gap: expected seq {size + 1}")
            if prev_hash != last_hash:
                raise IntegrationError(chain_id, seq, "prev_hash does not link to the last event")
            leaf = event_leaf(
                chain_id=chain_id,
                seq=seq,
                prev_hash=prev_hash,
                kind=kind,
                tenant_id=tenant_id,
                run_id=run_id,
                created_at=created_at,
                payload=payload,
            )
            if hashlib.sha256(leaf).hexdigest() != row_hash:
                raise IntegrationError(chain_id, seq, "hash does not match the event's leaf")
            level, index, h = 0, size, leaf_hash(leaf)
            new[(0, index)] = h
            while index & 1:
                left = new.get((level, index - 1)) or edge[(level, index - 1)]
                h = node_hash(left, h)
                level, index = level + 1, index >> 1
                new[(level, index)] = h
            size, last_hash = seq, row_hash
            edge = {k: new.get(k) or edge[k] for k in frontier(size)}
        session.execute(
            insert(MerkleNode),
            [
                {"chain_id": chain_id, "level": lv, "idx": i, "hash": h}
                for (lv, i), h in new.items()
            ],
        )
        taken += len(rows)
    root = compact_root([edge[k] for k in frontier(size)])
    if size != current.size:
        session.execute(
            update(MerkleTree)
            .where(MerkleTree.chain_id == chain_id)
            .values(size=size, root=root, last_hash=last_hash, updated_at=datetime.now(UTC))
        )
        log.info("tree.integrated chain=%s size=%s added=%s", chain_id, size, taken)
    return TreeState(chain_id, size, root, last_hash)


def _source(session: Session, chain_id: str, build: object) -> NodeSource:
    keys = needed_nodes(build)  # type: ignore[arg-type]
    found = _fetch(session, chain_id, keys)
    missing = keys - found.keys()
    if missing:
        raise LedgerError(
            f"{chain_id}: the tree is not integrated that far ({len(missing)} subtrees missing)"
        )
    return lambda level, index: found[(level, index)]


def _within(session: Session, chain_id: str, size: int) -> None:
    integrated = state(session, chain_id).size
    if size > integrated:
        raise LedgerError(
            f"{chain_id}: tree size {size} is beyond the integrated size {integrated}"
        )


def prove_inclusion(
    session: Session, chain_id: str, index: int, size: int
) -> tuple[list[bytes], bytes]:
    """The inclusion proof of leaf ``index`` (seq - 1) in the tree of ``size``, and its root."""
    _within(session, chain_id, size)

    def build(nodes: NodeSource) -> tuple[list[bytes], bytes]:
        return inclusion_proof(nodes, index, size), tree_root(nodes, size)

    return build(_source(session, chain_id, build))


def prove_consistency(
    session: Session, chain_id: str, old: int, new: int
) -> tuple[list[bytes], bytes, bytes]:
    """The consistency proof from size ``old`` to ``new``, with both roots."""
    _within(session, chain_id, new)

    def build(nodes: NodeSource) -> tuple[list[bytes], bytes, bytes]:
        return consistency_proof(nodes, old, new), tree_root(nodes, old), tree_root(nodes, new)

    return build(_source(session, chain_id, build))
