"""Result ingest: verify each receipt, bind it to the dispatched envelope, accept once.

Acceptance is exactly once per (node, attempt): the node row is locked, and a
result is accepted only while the node is ``queued`` at that attempt. What is
not accepted is recorded (ToolReceiptInvalid, JobRefused) or, for a valid
duplicate of an already settled attempt, logged and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from control.states import TERMINAL_NODE, NodeStatus, RunStatus
from ledger.chain import NewEvent
from ledger.models import Node, Run, ToolManifest
from ledger.receipts import ReceiptProblem, check_result_message
from ledger.store import append_events
from toolplane.canonical import CanonicalJSONError, check_json_value, contains_nul, digest
from toolplane.errors import SignatureError
from toolplane.messages import ResultMessage, SignedManifest, job_id_for, ms_to_datetime
from toolplane.signing import KeyRing

log = logging.getLogger("toolplane.ingest")

__all__ = ["Outcome", "Settle", "ingest_result", "register_manifest"]


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    """A verified result was accepted for its node and attempt."""
    RECEIPT_INVALID = "receipt_invalid"
    """Signature, hash or binding failed; recorded as ToolReceiptInvalid."""
    REFUSED = "refused"
    """A worker's signed refusal; recorded as JobRefused."""
    DUPLICATE = "duplicate"
    """A valid result for an attempt already settled; ignored."""


def _safe(raw: Any) -> Any:
    """What we can store of an untrusted message: itself if JSON-safe, else its repr."""
    try:
        check_json_value(raw)
        digest(raw)
    except CanonicalJSONError:
        return {"unparseable": repr(raw)[:4000]}
    if contains_nul(raw):  # repr escapes it
        return {"unparseable": repr(raw)[:4000]}
    return raw


def _claimed(raw: Any) -> tuple[str | None, str | None, int | None]:
    result = raw.get("result") if isinstance(raw, dict) else None
    if not isinstance(result, dict):
        return None, None, None
    run_id, node_id, attempt = result.get("run_id"), result.get("node_id"), result.get("attempt")

    def ident(value: Any) -> str | None:  # an id the database can look up
        ok = isinstance(value, str) and 0 < len(value) <= 200 and "\x00" not in value
        return value if ok else None

    return (
        ident(run_id),
        ident(node_id),
        attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
    )


def _lock_node(
    session: Session, run_id: str | None, node_id: str | None
) -> tuple[Node, Run] | None:
    if not run_id or not node_id:
        return None
    return _lock(session, Node.run_id == run_id, Node.node_id == node_id)


def _lock_by_envelope(session: Session, envelope_sha256: str) -> tuple[Node, Run] | None:
    return _lock(session, Node.envelope_sha256 == envelope_sha256)


def _lock(session: Session, *where: Any) -> tuple[Node, Run] | None:
    """Lock a node and its run (in one statement) for the settling of a result."""
    found = session.execute(
        select(Node, Run).join(Run, Run.id == Node.run_id).where(*where).with_for_update()
    ).first()
    return None if found is None else (found[0], found[1])


def _settle_run(run: Run, node: Node, events: list[NewEvent], now: datetime) -> None:
    """Single-node runs: the run ends with its node."""
    if node.status not in TERMINAL_NODE:
        return
    run.status = RunStatus.COMPLETED if node.status == NodeStatus.COMPLETED else RunStatus.FAILED
    run.updated_at = now
    kind = "RunCompleted" if run.status == RunStatus.COMPLETED else "RunFailed"
    events.append(
        NewEvent(kind, {"run_id": run.id, "status": run.status.value}, run.tenant_id, run.id)
    )


Settle = Callable[[str, str, int | None], None]
"""Settle a job's entitlement reservation: (tenant id, job id, charged ms or None for all)."""


def _no_settle(tenant_id: str, job_id: str, charged_ms: int | None) -> None:
    return None


def ingest_result(
    session: Session, raw: Any, keys: KeyRing, settle: Settle = _no_settle
) -> Outcome:
    """Ingest one message from the ``results`` queue. Commits.

    ``settle`` is told how much tool time each settled job used (its verified
    duration when it completed or hit its time limit; nothing when it otherwise
    failed or was refused; all it reserved when its receipt is invalid), before
    the commit, and is idempotent per job.
    """
    now = datetime.now(UTC)
    run_id, node_id, attempt = _claimed(raw)
    locked = _lock_node(session, run_id, node_id)
    events: list[NewEvent] = []
    tenant = locked[1].tenant_id if locked else None

    def invalid(problem: str) -> Outcome:
        log.warning("receipt.invalid run=%s node=%s problem=%s", run_id, node_id, problem)
        events.append(
            NewEvent(
                "ToolReceiptInvalid",
                {
                    "problem": problem,
                    "claimed": {"run_id": run_id, "node_id": node_id, "attempt": attempt},
                    "message": _safe(raw),
                },
                tenant_id=tenant,
                run_id=run_id if locked else None,
            )
        )
        if locked and locked[0].status == NodeStatus.QUEUED and attempt == locked[0].attempt:
            node, run = locked
            settle(run.tenant_id, job_id_for(run.id, node.node_id, node.attempt), None)
            node.status = NodeStatus.REJECTED
            node.error = {"code": "receipt_invalid", "message": problem}
            node.updated_at = now
            _settle_run(run, node, events, now)
        append_events(session, events)
        session.commit()
        return Outcome.RECEIPT_INVALID

    if contains_nul(raw):
        return invalid("message contains NUL characters, which the ledger cannot store")
    try:
        message: ResultMessage = check_result_message(raw, keys)
    except ReceiptProblem as e:
        return invalid(e.message)
    result = message.result
    bound = (
        locked is not None
        and result.attempt == locked[0].attempt
        and result.envelope_sha256 == locked[0].envelope_sha256
        and result.tool == locked[0].tool
    )
    body = message.model_dump(mode="json")

    if result.kind == "refusal":
        code = result.error.code if result.error else "envelope_invalid"
        if not bound and result.envelope_sha256:
            # A worker that could not verify an envelope trusts none of its ids, but
            # names the digest of what it received: the exact envelope we dispatched.
            locked = _lock_by_envelope(session, result.envelope_sha256)
            bound = locked is not None
            if locked is not None:
                tenant, run_id = locked[1].tenant_id, locked[1].id
        events.append(
            NewEvent(
                "JobRefused",
                {"bound": bound, "code": code, "message": body},
                tenant_id=tenant if bound else None,
                run_id=run_id if bound else None,
            )
        )
        if bound and locked and locked[0].status == NodeStatus.QUEUED and code != "replay":
            node, run = locked
            settle(run.tenant_id, job_id_for(run.id, node.node_id, node.attempt), 0)
            node.status = NodeStatus.FAILED
            node.error = result.error.model_dump() if result.error else None
            node.receipt = message.receipt.model_dump()
            node.updated_at = now
            _settle_run(run, node, events, now)
        append_events(session, events)
        session.commit()
        return Outcome.REFUSED

    if not bound or locked is None:
        return invalid("result is not bound to a dispatched envelope of this node and attempt")
    node, run = locked
    if node.status != NodeStatus.QUEUED:
        log.info("result.duplicate run=%s node=%s attempt=%s", run.id, node.node_id, result.attempt)
        session.rollback()
        return Outcome.DUPLICATE
    # A failure is refunded, except a call cut off at its time limit: it spent that time.
    timed_out = result.error is not None and result.error.code == "timeout"
    settle(
        run.tenant_id,
        job_id_for(run.id, node.node_id, node.attempt),
        result.duration_ms if result.ok or timed_out else 0,
    )
    node.status = NodeStatus.COMPLETED if result.ok else NodeStatus.FAILED
    node.result = result.result
    node.result_sha256 = result.result_sha256
    node.receipt = message.receipt.model_dump()
    node.error = result.error.model_dump() if result.error else None
    node.updated_at = now
    events.append(
        NewEvent(
            "ToolCallCompleted" if result.ok else "ToolCallFailed",
            {
                "node_id": node.node_id,
                "attempt": node.attempt,
                "envelope_sha256": node.envelope_sha256,
                "result_sha256": result.result_sha256,
                "receipt_key_id": message.receipt.key_id,
                "message": body,
            },
            tenant_id=run.tenant_id,
            run_id=run.id,
        )
    )
    _settle_run(run, node, events, now)
    append_events(session, events)
    session.commit()
    return Outcome.ACCEPTED


def register_manifest(session: Session, raw: Any, keys: KeyRing) -> str:
    """Register a tool's signed manifest; returns the tool name. Commits."""
    try:
        signed = SignedManifest.model_validate(raw)
        tool = str(signed.manifest["name"])
        keys.verify(
            key_id=signed.receipt.key_id,
            algorithm=signed.receipt.algorithm,
            data=signed.body(),
            signature=signed.receipt.signature,
            owner=f"tool.{tool}",
            at=ms_to_datetime(signed.issued_at),
        )
    except (ValidationError, KeyError, SignatureError, CanonicalJSONError) as e:
        log.warning("manifest.invalid problem=%s", e)
        raise ReceiptProblem(f"manifest refused: {e}") from e
    sha = digest(signed.manifest)
    current = session.get(ToolManifest, tool)
    if current is not None and current.manifest_sha256 == sha:
        return tool
    values = {
        "tool": tool,
        "version": str(signed.manifest.get("version", "")),
        "manifest": signed.manifest,
        "manifest_sha256": sha,
        "key_id": signed.receipt.key_id,
        "registered_at": datetime.now(UTC),
    }
    session.execute(
        pg_insert(ToolManifest)
        .values(**values)
        .on_conflict_do_update(index_elements=["tool"], set_=values)
    )
    append_events(
        session,
        [
            NewEvent(
                "ToolRegistered",
                {
                    "tool": tool,
                    "manifest_sha256": sha,
                    "key_id": signed.receipt.key_id,
                    "manifest": signed.manifest,
                },
            )
        ],
    )
    session.commit()
    log.info("tool.registered tool=%s sha=%s", tool, sha[:12])
    return tool
