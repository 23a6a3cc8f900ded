"""Result ingest: verify each receipt, bind it to a dispatched attempt, accept once.

Nothing unverified changes state. Any tool's workers may push onto ``results``, so
a message's ids are not looked up, and no run is locked, until its receipt verifies;
the run is then the one dispatched with the envelope digest that the verified
result names (its ``attempts`` row), and the result's tool, run, node and attempt
must be that attempt's. A message that does not verify or is not so bound changes
no node, run, attempt or reservation: it is recorded once, size-capped, as
ToolReceiptInvalid on the system chain, and counted
(control.orchestration.unverified). A node whose worker never answers with a
verified result times out like any lost attempt.

Acceptance is exactly once per node: the run is locked (then its nodes), and a
result is accepted only while its node is ``queued`` at that very attempt. What
else is verified and bound is recorded: JobRefused, or ResultIgnored for a result
that came too late (a redelivered copy, an attempt that was superseded by a retry,
a node that was cancelled). An accepted result advances the run: nodes that needed
it are marked due in its transaction, and decided and dispatched right after it
commits (or else by the sweeper).

Results are ingested in batches (``ingest_batch``): the messages that already wait, up to
``TOOLPLANE_INGEST_BATCH``, are each verified on their own and then applied in one
transaction (each run locked once, each chain head locked once, the evidence of each chain
in one multi-row insert, one commit), with the same guarantees as one at a time. The
decision for one verified result against its locked run is
control.orchestration.acceptance's.

A receipt's key (and a manifest's) is judged by when the control receives the
message, under a lock on the key's row (control.governance.keys.judge_key), never by the
message's own timestamps; the evidence is recorded at that very time, which is what
the ledger's verification judges the key by later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from control.governance.keys import judge_key, utc_now
from control.orchestration.acceptance import Outcome, Settle, decide
from control.orchestration.artifacts import Artifacts
from control.orchestration.intake import Governance, dispatching
from control.orchestration.orchestrator import RunState, advance, lock_run
from control.orchestration.spans import record_ingest
from control.orchestration.unverified import DETAIL_CAP, record_unverified
from ledger.chain import NewEvent
from ledger.models import Attempt, Node, Run
from ledger.receipts import ReceiptProblem, check_result_message
from ledger.store import append_events
from toolplane import logfields
from toolplane.canonical import contains_nul
from toolplane.messages import ResultMessage
from toolplane.signing import KeyRing
from toolplane.tracing import tracing_on

log = logging.getLogger("toolplane.ingest")

__all__ = [
    "Ingested",
    "Outcome",
    "Settle",
    "advance_ready",
    "ingest_batch",
    "ingest_result",
    "record_unprocessable",
]


def _claimed(raw: Any) -> dict[str, Any]:
    """The ids an unverified message names: kept as its claim, never looked up."""
    result = raw.get("result") if isinstance(raw, dict) else None
    if not isinstance(result, dict):
        return {}

    def ident(value: Any) -> str | None:  # short strings only: the rest is in the message
        return value if _storable(value, 200) else None

    attempt = result.get("attempt")
    return {
        "run_id": ident(result.get("run_id")),
        "node_id": ident(result.get("node_id")),
        "attempt": attempt if type(attempt) is int and abs(attempt) < 2**53 else None,
        "tool": ident(result.get("tool")),
    }


def _storable(value: Any, limit: int) -> bool:
    """A non-empty string of at most ``limit`` characters that the database can take (no
    NUL, no lone surrogate, which JSON may carry as an escape)."""
    if not isinstance(value, str) or not 0 < len(value) <= limit or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, storable (NUL and lone surrogates escaped)."""
    cut = value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return cut.replace("\x00", "\\x00")


def _receipt_key_id(raw: Any) -> str | None:
    """The key id a message names: it only selects the key to verify with (None when it
    could not name one)."""
    receipt = raw.get("receipt") if isinstance(raw, dict) else None
    key_id = receipt.get("key_id") if isinstance(receipt, dict) else None
    return key_id if _storable(key_id, 120) else None


def _no_settle(tenant_id: str, job_id: str, charged_ms: int | None) -> None:
    return None


@dataclass(frozen=True)
class Ingested:
    outcome: Outcome
    outbox_ids: tuple[int, ...] = ()  # jobs of nodes that became ready: publish after commit
    ready_run: str | None = None
    """With ``advance=False``: the run whose ready nodes the caller is to decide
    (``advance_ready``) after the commit."""


@dataclass
class _Unverified:
    index: int
    problem: str
    detail: str


@dataclass
class _Batch:
    """What a batch found: each message's outcome, what to record as unverified, and the
    runs whose ready nodes are to be decided after the commit (run id -> message index)."""

    outcomes: list[Outcome | None]
    unverified: list[_Unverified] = field(default_factory=list)
    ready: dict[str, int] = field(default_factory=dict)
    traced: list[dict[str, Any]] = field(default_factory=list)  # ingest spans, if tracing


def ingest_result(
    session: Session,
    raw: Any,
    keys: KeyRing,
    gov: Governance,
    settle: Settle = _no_settle,
) -> Ingested:
    """Ingest one message from the ``results`` queue (a batch of one). Commits."""
    return ingest_batch(session, [raw], keys, gov, settle)[0]


def ingest_batch(
    session: Session,
    raws: Sequence[Any],
    keys: KeyRing,
    gov: Governance,
    settle: Settle = _no_settle,
    *,
    before_commit: Callable[[], None] | None = None,
    advance: bool = True,
) -> list[Ingested]:
    """Ingest messages from the ``results`` queue, one ``Ingested`` each, in order.

    Each receipt is verified on its own, and nothing is looked up or locked by what a
    message says until its receipt verifies; then its run is found by the verified
    envelope digest (the attempt dispatched with it), never by the ids it names. Every
    verified and bound message is applied in ONE transaction: the keys' rows, then the
    runs (in id order), then each chain head once, one multi-row insert of the evidence
    per chain, one commit. A message that does not verify, or is not bound to the
    attempt dispatched with its digest, changes nothing and delays nothing: it is
    recorded on the system chain afterwards, in a transaction of its own
    (control.orchestration.unverified). Copies of one result in a batch meet the same
    locked node, so the first is accepted and the rest are ResultIgnored, as across
    batches. Raises (after no commit of the batch) on an error; the caller may retry
    the messages one at a time.

    ``settle`` is told how much tool time each settled job used (its verified
    duration when it ran; nothing when it failed without running or was refused),
    before the commit, and is idempotent per job. With ``advance``, the nodes that became
    ready are decided after the commit, each run in a transaction of its own; without, each
    such run is named in its result's ``ready_run`` for the caller to decide
    (``advance_ready``), so that the batch's messages can be acknowledged sooner.
    ``before_commit`` is a fault-injection point for tests.
    """
    started_ns = time.time_ns()  # each ingest span's start
    # When the control receives them: the keys' trust and every event's time. A key id
    # only selects the key to verify with; every row is locked before the clock is read.
    now: datetime | None = None
    key_ids: Sequence[str | None] = sorted({k for k in map(_receipt_key_id, raws) if k is not None})
    for key_id in key_ids or [None]:
        keys, now = judge_key(session, keys, key_id)
    assert now is not None
    batch = _Batch(outcomes=[None] * len(raws))
    verified: list[tuple[int, ResultMessage]] = []
    for index, raw in enumerate(raws):
        if contains_nul(raw):
            problem = ("nul", "message contains NUL characters, which the ledger cannot store")
            batch.unverified.append(_Unverified(index, *problem))
            continue
        try:
            verified.append((index, check_result_message(raw, keys, received=now)))
        except ReceiptProblem as e:
            batch.unverified.append(_Unverified(index, e.kind, e.message))
    if verified:
        _apply(session, batch, verified, settle, now, gov.artifacts)
        if before_commit is not None:
            before_commit()
    session.commit()
    ended_ns = time.time_ns()
    for traced in batch.traced:
        record_ingest(**traced, start_ns=started_ns, end_ns=ended_ns)
    for item in batch.unverified:
        _record_unverified(session, raws[item.index], item, now)
        batch.outcomes[item.index] = Outcome.RECEIPT_INVALID
    ready = {index: run_id for run_id, index in batch.ready.items()}
    ingested = []
    for index, outcome in enumerate(batch.outcomes):
        assert outcome is not None  # each message verified and decided, or recorded
        run_id = ready.get(index)
        if run_id is None:
            ingested.append(Ingested(outcome))
        elif advance:
            ingested.append(Ingested(outcome, advance_ready(session, gov, run_id)))
        else:
            ingested.append(Ingested(outcome, ready_run=run_id))
    return ingested


def _apply(
    session: Session,
    batch: _Batch,
    verified: list[tuple[int, ResultMessage]],
    settle: Settle,
    now: datetime,
    artifacts: Artifacts | None,
) -> None:
    """Bind each verified message to its dispatched attempt, lock the runs, decide each
    result in order, and append all their evidence (in the caller's transaction)."""
    digests = sorted({m.result.envelope_sha256 for _, m in verified if m.result.envelope_sha256})
    where = (
        session.execute(
            select(Attempt.run_id, Attempt.envelope_sha256).where(
                Attempt.envelope_sha256.in_(digests)
            )
        ).all()
        if digests
        else []
    )
    states = _lock_runs(session, sorted({row.run_id for row in where}))
    dispatched: dict[str, Attempt] = {}
    if states:  # the rows, read again under the runs' locks
        for row in session.scalars(
            select(Attempt)
            .where(Attempt.envelope_sha256.in_(digests))
            .execution_options(populate_existing=True)
        ):
            dispatched[row.envelope_sha256] = row
    events: list[NewEvent] = []
    for index, message in verified:
        attempt = dispatched.get(message.result.envelope_sha256 or "")
        state = states.get(attempt.run_id) if attempt is not None else None
        ids = {"tenant": state.run.tenant_id} if state is not None else {}
        if attempt is not None:  # bound to the attempt its envelope digest names
            ids |= {"run_id": attempt.run_id, "node_id": attempt.node_id, "job_id": attempt.job_id}
        with logfields.bound(**ids):
            decided = decide(session, message, state, attempt, settle, events, now, artifacts)
            if decided is not None:
                log.info("result.decided outcome=%s kind=%s", decided.outcome, message.result.kind)
        if decided is None:  # not bound to the attempt dispatched with its digest
            batch.unverified.append(
                _Unverified(
                    index,
                    "unbound",
                    "result is not bound to a dispatched envelope of its tool, run, node "
                    "and attempt",
                )
            )
            continue
        batch.outcomes[index] = decided.outcome
        if tracing_on() and attempt is not None and state is not None:
            batch.traced.append(_ingest_trace(state, attempt, message, decided.outcome))
        if decided.ready and state is not None:
            batch.ready[state.run.id] = index
    append_events(session, events, at=now)


def _ingest_trace(
    state: RunState, attempt: Attempt, message: ResultMessage, outcome: Outcome
) -> dict[str, Any]:
    """What the ingest span of a bound result needs: the run, node and attempt from the
    control's own rows, the traceparent of the envelope it signed for that attempt (the
    node's, if still that attempt's), and the one the result claims (only compared)."""
    node = state.nodes.get(attempt.node_id)
    signed = (
        node.envelope
        if node is not None and node.envelope_sha256 == attempt.envelope_sha256
        else None
    )
    envelope = (signed or {}).get("envelope") or {}
    return {
        "run_id": attempt.run_id,
        "node_id": attempt.node_id,
        "attempt": attempt.attempt,
        "tool": message.result.tool,
        "outcome": outcome.value,
        "dispatched": envelope.get("traceparent"),
        "claimed": message.result.traceparent,
    }


def _lock_runs(session: Session, run_ids: list[str]) -> dict[str, RunState]:
    """Lock the runs in id order (as every run lock is taken, one or many: no deadlock),
    then read their nodes; one statement each."""
    if not run_ids:
        return {}
    runs = session.scalars(
        select(Run)
        .where(Run.id.in_(run_ids))
        .order_by(Run.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    nodes: dict[str, dict[str, Node]] = {run.id: {} for run in runs}
    for node in session.scalars(
        select(Node)
        .where(Node.run_id.in_(run_ids))
        .order_by(Node.run_id, Node.created_at, Node.node_id)
        .execution_options(populate_existing=True)
    ):
        nodes[node.run_id][node.node_id] = node
    return {run.id: RunState(run, nodes[run.id], session) for run in runs}


def _record_unverified(session: Session, raw: Any, item: _Unverified, now: datetime) -> None:
    """Record a message that did not verify or bind, in a transaction of its own."""
    claimed = _claimed(raw)
    log.warning(
        "receipt.invalid problem=%s claimed_run=%s claimed_node=%s detail=%s",
        item.problem,
        claimed.get("run_id"),
        claimed.get("node_id"),
        _text(item.detail, 200),
    )
    record_unverified(
        session,
        raw,
        evidence="ToolReceiptInvalid",
        problem=item.problem,
        payload={"problem": _text(item.detail, DETAIL_CAP), "claimed": claimed},
        at=now,
    )
    session.commit()


def advance_ready(session: Session, gov: Governance, run_id: str) -> tuple[int, ...]:
    """Decide and dispatch the run's ready nodes (after the acceptance that readied them
    committed); the outbox ids to publish. Commits. On any error, the sweeper decides them."""
    try:
        state = lock_run(session, run_id)
        assert state is not None
        events: list[NewEvent] = []
        with dispatching(session, gov) as done:
            advance(session, gov, state, events, done)
            append_events(session, events)
        return tuple(done.outbox_ids)
    except Exception:  # accepted already: the sweeper decides the ready nodes
        session.rollback()
        log.warning("advance.deferred run=%s (the sweeper retries)", run_id, exc_info=True)
        return ()


def record_unprocessable(session: Session, raw: Any, error: BaseException) -> None:
    """Evidence of a message that ingest failed on again and again (then acknowledged):
    on the system chain, once per distinct message, size-capped, counted as
    ``ingest_failed`` (control.orchestration.unverified)."""
    session.rollback()
    record_unverified(
        session,
        raw,
        evidence="IngestFailed",
        problem="ingest_failed",
        payload={"error": _text(f"{type(error).__name__}: {error}", DETAIL_CAP)},
        at=utc_now(),
    )
    session.commit()
