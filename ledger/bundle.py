"""Exporting one run's evidence as an offline bundle (format: ledger/bundle_check.py).

Each of the run's events goes in as its leaf bytes, with an inclusion proof against a
signed checkpoint that covers it; the keys that signed its envelopes and receipts go in
with their validity windows, and the artifacts (results kept outside the database) that
its events name go in with their bytes. ``toolplane ledger verify-bundle`` checks it offline.
"""

from __future__ import annotations

import base64
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger.artifacts import ArtifactRef, ArtifactStore, checked_bytes
from ledger.bundle_check import BUNDLE_FORMAT, RECEIPT_KINDS, artifact_to_json, key_to_json
from ledger.checkpoint import Checkpoint
from ledger.errors import LedgerError
from ledger.leaf import event_leaf
from ledger.models import EvidenceEvent
from ledger.tree import prove_inclusion
from toolplane.canonical import canonical_json
from toolplane.signing import KeyRing

__all__ = ["build_bundle"]


def _key_ids(kind: str, payload: dict[str, Any]) -> set[str]:
    found = set()
    if kind == "ToolCallDispatched":
        envelope = (payload.get("envelope") or {}).get("envelope") or {}
        found.add(str(envelope.get("key_id")))
    elif kind in RECEIPT_KINDS and isinstance(payload.get("message"), dict):
        found.add(str((payload["message"].get("receipt") or {}).get("key_id")))
    return found


def build_bundle(
    session: Session,
    *,
    chain_id: str,
    run_id: str,
    checkpoint: Checkpoint,
    note: bytes,
    keys: KeyRing,
    artifacts: ArtifactStore | None = None,
) -> bytes:
    """The bundle of ``run_id``'s events in ``chain_id``, proven against ``checkpoint``
    (which must cover them: sign one first), with the bytes of the artifacts they name,
    read from ``artifacts`` and checked (an ArtifactProblem names one that is not)."""
    t = EvidenceEvent
    rows = session.execute(
        select(t.seq, t.prev_hash, t.kind, t.tenant_id, t.run_id, t.created_at, t.payload, t.hash)
        .where(t.chain_id == chain_id, t.run_id == run_id)
        .order_by(t.seq)
    ).all()
    if not rows:
        raise LedgerError(f"run {run_id}: no evidence in {chain_id}")
    if rows[-1].seq > checkpoint.size:
        raise LedgerError(
            f"run {run_id}: its last event (seq {rows[-1].seq}) is past the newest checkpoint "
            f"(size {checkpoint.size})"
        )
    events, used, carried_artifacts = [], set(), {}
    for seq, prev_hash, kind, tenant_id, row_run, created_at, payload, _hash in rows:
        leaf = event_leaf(
            chain_id=chain_id,
            seq=seq,
            prev_hash=prev_hash,
            kind=kind,
            tenant_id=tenant_id,
            run_id=row_run,
            created_at=created_at,
            payload=payload,
        )
        proof, root = prove_inclusion(session, chain_id, seq - 1, checkpoint.size)
        if root != checkpoint.root:
            raise LedgerError(f"{chain_id}: the stored tree disagrees with the signed checkpoint")
        events.append(
            {
                "seq": seq,
                "leaf": base64.b64encode(leaf).decode(),
                "proof": [base64.b64encode(p).decode() for p in proof],
            }
        )
        used |= _key_ids(kind, payload)
        if kind in RECEIPT_KINDS and "artifact" in payload:
            ref = ArtifactRef.of(payload["artifact"])
            data = checked_bytes(artifacts, ref)
            carried_artifacts[ref.sha256] = artifact_to_json(ref, data)
    carried = [key_to_json(k) for k in keys if k.key_id in used and k.algorithm == "ed25519"]
    bundle = {
        "format": BUNDLE_FORMAT,
        "run_id": run_id,
        "checkpoint": note.decode("utf-8"),
        "events": events,
        "keys": sorted(carried, key=lambda k: k["key_id"]),
    }
    if carried_artifacts:  # only then: a bundle without artifacts is as it always was
        bundle["artifacts"] = [carried_artifacts[h] for h in sorted(carried_artifacts)]
    return canonical_json(bundle)
