"""Submission in fewer statements: what each merged or pipelined statement must still do."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from control.governance.freeze import active_freeze, freeze
from ledger.db import pipelined
from ledger.models import Attempt, EvidenceEvent, OutboxMessage, Run
from tests.harness import Stack

pytestmark = pytest.mark.integration


def test_a_freeze_that_commits_while_a_dispatch_waits_for_its_lock_is_seen(
    stack: Stack, token: str
) -> None:
    """The freeze is read in a statement of its own after the locks (in one pipeline): a
    read in the locking statement would use a snapshot from before the freeze committed."""
    admin = stack.client(token)
    tenant_id = admin.identity.tenant_id
    freezer = admin.plane.sessions()
    freeze(freezer, admin.identity, everything=False, reason="mid-dispatch")  # holds the lock
    seen: list[object] = []

    def dispatch() -> None:
        with admin.plane.sessions() as session:
            seen.append(active_freeze(session, tenant_id))
            session.rollback()

    thread = threading.Thread(target=dispatch)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive(), "the dispatch did not wait for the freeze's lock"
    freezer.commit()
    freezer.close()
    thread.join(10)
    assert not thread.is_alive()
    [row] = seen
    assert row is not None and row.scope == tenant_id and row.reason == "mid-dispatch"


def test_a_failing_statement_in_a_pipeline_is_sqlalchemys_error(stack: Stack, token: str) -> None:
    ops = stack.client(token)
    with ops.plane.sessions() as session:
        with pytest.raises(DBAPIError, match="division by zero"):
            pipelined(session, [("SELECT 1 AS one", {}), ("SELECT 1 / %(zero)s", {"zero": 0})])
        session.rollback()
        [[row]] = pipelined(session, [("SELECT %(x)s::int AS x", {"x": 7})])
        assert row.x == 7


def test_a_call_writes_its_attempt_job_and_evidence_in_order(stack: Stack, token: str) -> None:
    ops = stack.client(token)
    view = ops.submit_call("read_repo_file", {"path": "src/shipit/deploy.py"})
    with ops.plane.sessions() as session:
        attempt = session.scalars(select(Attempt).where(Attempt.run_id == view.run_id)).one()
        job = session.scalars(
            select(OutboxMessage).where(OutboxMessage.run_id == view.run_id)
        ).one()
        events = session.execute(
            select(EvidenceEvent.kind, EvidenceEvent.seq, EvidenceEvent.id)
            .where(EvidenceEvent.run_id == view.run_id)
            .order_by(EvidenceEvent.seq)
        ).all()
    assert (attempt.attempt, attempt.status) == (1, "queued")
    assert (job.attempt, job.body["envelope"]["job_id"]) == (1, attempt.job_id)
    assert job.queue == job.task_name == "tool.read_repo_file"
    kinds = [kind for kind, _, _ in events]
    assert kinds[:3] == ["RunSubmitted", "PolicyDecision", "ToolCallDispatched"]
    assert [i for _, _, i in events] == sorted(i for _, _, i in events)  # ids follow seq
    assert ops.wait(view.run_id, timeout=60).status == "completed"
    report = ops.verify_ledger(run_id=view.run_id)
    assert report.ok and report.events >= 4, report


def test_a_key_taken_by_a_submission_in_flight_returns_its_run(stack: Stack, token: str) -> None:
    """The run's row goes in with the freeze's locks, in one pipeline: a unique key taken
    meanwhile by another transaction still comes back as its run (the race of one key)."""
    ops = stack.client(token)
    key = f"race-{time.time_ns()}"
    now = datetime.now(UTC)
    first = ops.plane.sessions()
    first.add(
        Run(
            id=f"run_race{time.time_ns() % 10**16:016d}",
            tenant_id=ops.identity.tenant_id,
            principal_id=ops.identity.principal_id,
            workflow="call",
            status="running",
            environment="dev",
            classification="internal",
            idempotency_key=key,
            created_at=now,
            updated_at=now,
        )
    )
    first.flush()  # the key is taken, not yet committed
    [(run_id,)] = first.execute(select(Run.id).where(Run.idempotency_key == key)).all()
    got: list[object] = []

    def submit() -> None:
        got.append(ops.submit_call("read_repo_file", {"path": "README.md"}, idempotency_key=key))

    thread = threading.Thread(target=submit)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive(), "the second insert of the key did not wait for the first"
    first.commit()
    first.close()
    thread.join(30)
    [view] = got
    assert view.run_id == run_id  # type: ignore[attr-defined]
    with ops.plane.sessions() as session:
        assert session.scalar(select(func.count()).where(Run.idempotency_key == key)) == 1
