"""Verification of the evidence ledger: every link, every result hash, every receipt.

Names each broken event. A chain whose head row says more events exist than the
table holds is reported as truncated.

A receipt is judged by when the control accepted it, the time of its evidence event
in the chain (``created_at``, covered by the event's hash; ingest records the events
at the very time it judged the key), never by the time the result claims. So the
evidence of a key's work verifies after that key was rotated (its grace covers what
arrived late) or revoked (what was accepted before the revocation stays valid), and a
receipt that the control took after a revocation is named as broken.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger.artifacts import ArtifactProblem, ArtifactStore, message_with_artifact
from ledger.chain import GENESIS, chain_for
from ledger.checkpoint import Checkpoint
from ledger.leaf import event_leaf
from ledger.links import LinkChecker
from ledger.merkle import leaf_hash
from ledger.models import ChainHead, EvidenceEvent
from ledger.receipts import ReceiptProblem, check_result_message
from ledger.roots import RootAt
from toolplane.errors import CanonicalJSONError, SignatureError
from toolplane.messages import SignedEnvelope, signed_bytes
from toolplane.signing import KeyRing

RECEIPT_KINDS = frozenset({"ToolCallCompleted", "ToolCallFailed", "JobRefused", "ResultIgnored"})

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
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.broken

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "chains": self.chains,
            "receipts_verified": self.receipts,
            "checkpoints": self.checkpoints,
            "broken": [b.as_dict() for b in self.broken],
        }


Row = tuple[int, str, int, str | None, str | None, str, dict[str, Any], datetime, str, str]
BATCH = 2000
PARALLEL_FROM = 4 * BATCH  # below this many events, verify in this process
NO_LEAF = leaf_hash(b"")  # of an event whose leaf cannot be made: no tree that was signed


def _rows(session: Session, chain_ids: list[str] | None) -> Iterator[list[Row]]:
    t = EvidenceEvent
    query = select(
        t.id,
        t.chain_id,
        t.seq,
        t.tenant_id,
        t.run_id,
        t.kind,
        t.payload,
        t.created_at,
        t.prev_hash,
        t.hash,
    ).order_by(t.chain_id, t.seq)
    if chain_ids is not None:
        query = query.where(t.chain_id.in_(chain_ids))
    for part in session.execute(query.execution_options(yield_per=BATCH)).partitions():
        yield [tuple(r) for r in part]  # type: ignore[misc]


_KEYS: KeyRing | None = None
_ARTIFACTS: ArtifactStore | None = None


def envelope_problem(payload: dict[str, Any], ring: KeyRing, at: datetime) -> str | None:
    """Why a ToolCallDispatched's envelope is not the control's, signed, with its digest."""
    try:
        signed = SignedEnvelope.model_validate(payload.get("envelope"))
        ring.verify(
            key_id=signed.envelope.key_id,
            algorithm="ed25519",
            data=signed_bytes(signed.envelope),
            signature=signed.signature,
            owner="control",
            received=at,
        )
    except (SignatureError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        return f"envelope: {str(e).splitlines()[0]}"
    if signed.digest != payload.get("envelope_sha256"):
        return "envelope: its digest is not the event's envelope_sha256"
    return None


def _init(keys: KeyRing, artifacts: ArtifactStore | None = None) -> None:
    global _KEYS, _ARTIFACTS
    _KEYS, _ARTIFACTS = keys, artifacts


Checked = tuple[str, str | None, bool, bytes]


def check_rows(
    rows: list[Row], keys: KeyRing | None = None, artifacts: ArtifactStore | None = None
) -> list[Checked]:
    """Per row: the recomputed hash, a receipt problem (or None), whether it had a receipt,
    and its Merkle leaf hash. A result kept as an artifact is read from ``artifacts`` and
    checked against its hash, then put back into the message whose receipt is checked."""
    ring = keys if keys is not None else _KEYS
    store = artifacts if artifacts is not None else _ARTIFACTS
    assert ring is not None
    out = []
    for _id, chain_id, seq, tenant_id, run_id, kind, payload, created_at, prev_hash, _h in rows:
        try:
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
        except CanonicalJSONError as e:  # written around the append API (e.g. 2**63): named
            out.append(("", f"not canonical JSON, so not as appended: {e}", False, NO_LEAF))
            continue
        recomputed = hashlib.sha256(leaf).hexdigest()
        problem, had = None, False
        if kind in RECEIPT_KINDS and "message" in payload:
            had = True
            try:
                message = message_with_artifact(payload, store)
                check_result_message(message, ring, received=created_at)
            except ArtifactProblem as e:
                problem = str(e)
            except ReceiptProblem as e:
                problem = f"receipt: {e.message}"
        elif kind == "ToolCallDispatched":
            problem = envelope_problem(payload, ring, created_at)
        out.append((recomputed, problem, had, leaf_hash(leaf)))
    return out


def _checked(
    batches: Iterator[list[Row]], keys: KeyRing, total: int, artifacts: ArtifactStore | None
) -> Iterator[tuple[Row, Checked]]:
    """Rows with their checks, in order; hashing and signatures use every core when large."""
    workers = os.cpu_count() or 1
    if total < PARALLEL_FROM or workers < 2:
        for batch in batches:
            yield from zip(batch, check_rows(batch, keys, artifacts), strict=True)
        return
    # spawn, not fork: a forked child would share (and could close) our database sockets.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init, initargs=(keys, artifacts)
    ) as pool:
        window: deque[tuple[list[Row], Future[list[Checked]]]] = deque()
        for batch in batches:
            window.append((batch, pool.submit(check_rows, batch)))
            if len(window) >= 2 * workers:
                done_batch, future = window.popleft()
                yield from zip(done_batch, future.result(), strict=True)
        while window:
            done_batch, future = window.popleft()
            yield from zip(done_batch, future.result(), strict=True)


def verify_ledger(
    session: Session,
    keys: KeyRing,
    *,
    tenant_id: str | None = None,
    run_id: str | None = None,
    checkpoints: dict[str, Checkpoint] | None = None,
    artifacts: ArtifactStore | None = None,
) -> VerifyReport:
    """Verify one tenant's chain (or every chain); ``run_id`` limits which events are named.

    ``checkpoints``: the newest signed checkpoint of each chain (its signature already
    verified against a pinned key); the chain must be at least that long and its tree
    of that size must have that root. ``artifacts``: the artifact store, where each
    artifact an event names is read and checked against its hash (one that is missing or
    changed is named)."""
    checkpoints = checkpoints or {}
    if not session.in_transaction():
        # One snapshot for the heads and the rows: an append that commits while the rows
        # are read must not look like a chain longer than its head (named as rewritten).
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    chain_ids = None if tenant_id is None else [chain_for(tenant_id)]
    report = VerifyReport()
    head_query = select(ChainHead)
    if chain_ids is not None:
        head_query = head_query.where(ChainHead.chain_id.in_(chain_ids))
    heads = {h.chain_id: (h.seq, h.hash) for h in session.scalars(head_query)}
    count_query = select(func.count()).select_from(EvidenceEvent)
    if chain_ids is not None:
        count_query = count_query.where(EvidenceEvent.chain_id.in_(chain_ids))
    total = int(session.scalar(count_query) or 0)

    current: str | None = None
    seen: set[str] = set()
    prev_hash, expected_seq = GENESIS, 1
    roots = RootAt(0)
    links = LinkChecker()

    def close_chain(chain_id: str, last_seq: int, last_hash: str) -> None:
        check_checkpoint(chain_id, last_seq, roots)
        head = heads.get(chain_id)
        if head is None:
            report.broken.append(Broken(None, chain_id, None, None, "chain has no head record"))
        elif head != (last_seq, last_hash):
            report.broken.append(
                Broken(
                    None,
                    chain_id,
                    head[0],
                    None,
                    f"chain truncated or rewritten: head {head[0]}, table ends at {last_seq}",
                )
            )

    def check_checkpoint(chain_id: str, last_seq: int, tree: RootAt) -> None:
        checkpoint = checkpoints.get(chain_id)
        if checkpoint is None:
            return
        report.checkpoints.append({"chain_id": chain_id, "size": checkpoint.size})
        if last_seq < checkpoint.size:
            report.broken.append(
                Broken(
                    None,
                    chain_id,
                    last_seq,
                    None,
                    f"log shorter than its checkpoint: checkpoint size {checkpoint.size}, "
                    f"table ends at seq {last_seq}",
                )
            )
        elif tree.root != checkpoint.root:
            report.broken.append(
                Broken(
                    None,
                    chain_id,
                    checkpoint.size,
                    None,
                    f"root of the first {checkpoint.size} events does not match the signed "
                    f"checkpoint of size {checkpoint.size} (events rewritten)",
                )
            )

    for row, (recomputed, problem, had_receipt, leaf) in _checked(
        _rows(session, chain_ids), keys, total, artifacts
    ):
        event_id, chain_id, seq, _t, row_run, kind, _p, _c, row_prev, row_hash = row
        if chain_id != current:
            if current is not None:
                close_chain(current, expected_seq - 1, prev_hash)
            current, prev_hash, expected_seq = chain_id, GENESIS, 1
            cp = checkpoints.get(chain_id)
            roots = RootAt(cp.size if cp else 0)
            links = LinkChecker()
            seen.add(chain_id)
            report.chains += 1
        report.events += 1
        named = run_id is None or row_run == run_id

        problems = []
        if seq != expected_seq:
            problems.append(f"sequence gap: expected seq {expected_seq}")
        if row_prev != prev_hash and named:
            problems.append("prev_hash does not link to the previous event")
        if recomputed != row_hash and named:
            problems.append("hash does not match the event's contents (tampered)")
        if problem is not None and named:
            problems.append(problem)
        elif had_receipt and named:
            report.receipts += 1
        link_problems = links.feed(kind, row_run, row[6])
        if named:
            problems.extend(link_problems)
        report.broken.extend(Broken(event_id, chain_id, seq, kind, text) for text in problems)
        roots.add(leaf)
        prev_hash, expected_seq = row_hash, seq + 1
    if current is not None:
        close_chain(current, expected_seq - 1, prev_hash)
    for chain_id in checkpoints:
        if chain_id not in seen:
            check_checkpoint(chain_id, 0, RootAt(0))
    for chain_id, (head_seq, _hash) in heads.items():
        if chain_id not in seen and head_seq > 0:
            report.broken.append(
                Broken(None, chain_id, head_seq, None, "chain head has no events (all deleted)")
            )
    return report
