"""The evidence ledger on real PostgreSQL: append-only, chained, verifiable."""

from __future__ import annotations

import json
import threading

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from ledger.chain import NewEvent, chain_for
from ledger.models import EvidenceEvent
from ledger.store import append_events
from ledger.verify import verify_ledger
from tests.harness import Stack, _libpq

pytestmark = pytest.mark.integration


def superuser(stack: Stack) -> psycopg.Connection:
    conn = psycopg.connect(_libpq(stack.services.database_url), autocommit=True)
    return conn


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE evidence_events SET payload = '{}'::jsonb WHERE id = (SELECT max(id) FROM evidence_events)",
        "DELETE FROM evidence_events WHERE id = (SELECT max(id) FROM evidence_events)",
        "TRUNCATE evidence_events",
    ],
)
def test_database_refuses_changes_to_evidence(stack: Stack, token: str, statement: str) -> None:
    stack.client(token).call("search_docs", {"query": "cedar"}, wait=True)
    with stack.client(token).plane.engine.connect() as connection:
        with pytest.raises(DBAPIError, match="append-only"):
            connection.execute(text(statement))


def test_tampered_payload_is_named_by_ledger_verify(stack: Stack, token: str) -> None:
    client = stack.client(token)
    view = client.call("read_repo_file", {"path": "README.md"}, wait=True)
    with client.plane.sessions() as session:
        event_id, payload = session.execute(
            select(EvidenceEvent.id, EvidenceEvent.payload).where(
                EvidenceEvent.run_id == view.run_id, EvidenceEvent.kind == "ToolCallCompleted"
            )
        ).one()
    payload["message"]["result"]["result"]["content"] = "nothing to see here"
    with superuser(stack) as conn:  # a superuser goes around the trigger
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "UPDATE evidence_events SET payload = %s::jsonb WHERE id = %s",
            (json.dumps(payload), event_id),
        )
    done = stack.cli("ledger", "verify", "--json", token=token)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False
    problems = [b["problem"] for b in report["broken"] if b["event_id"] == event_id]
    assert any("tampered" in p for p in problems), report
    assert any("receipt" in p for p in problems), report
    assert {b["event_id"] for b in report["broken"]} == {event_id}
    human = stack.cli("ledger", "verify", token=token)
    assert human.returncode == 1 and f"event {event_id}" in human.stdout


def test_tampered_receipt_with_rehashed_chain_is_still_caught(stack: Stack, token: str) -> None:
    """An attacker who rewrites the result and recomputes the chain still fails the receipt."""
    from ledger.chain import event_hash

    client = stack.client(token)
    view = client.call("read_repo_file", {"path": "README.md"}, wait=True)
    chain = chain_for(client.identity.tenant_id)
    with client.plane.sessions() as session:
        rows = list(
            session.scalars(
                select(EvidenceEvent)
                .where(EvidenceEvent.chain_id == chain)
                .order_by(EvidenceEvent.seq)
            )
        )
    target = next(r for r in rows if r.run_id == view.run_id and r.kind == "ToolCallCompleted")
    payload = dict(target.payload)
    payload["message"]["result"]["result"]["content"] = "forged"
    with superuser(stack) as conn:
        conn.execute("SET session_replication_role = replica")
        prev = None
        for row in rows:
            body = payload if row.id == target.id else row.payload
            prev_hash = row.prev_hash if prev is None else prev
            new_hash = event_hash(
                chain_id=row.chain_id,
                seq=row.seq,
                prev_hash=prev_hash,
                kind=row.kind,
                tenant_id=row.tenant_id,
                run_id=row.run_id,
                created_at=row.created_at,
                payload=body,
            )
            conn.execute(
                "UPDATE evidence_events SET payload = %s::jsonb, prev_hash = %s, hash = %s WHERE id = %s",
                (json.dumps(body), prev_hash, new_hash, row.id),
            )
            prev = new_hash
        conn.execute("UPDATE chain_heads SET hash = %s WHERE chain_id = %s", (prev, chain))
    report = client.verify_ledger()
    assert not report.ok
    assert [b.event_id for b in report.broken] == [target.id]
    assert "receipt" in report.broken[0].problem


def test_truncated_tail_is_detected(stack: Stack, token: str) -> None:
    client = stack.client(token)
    client.call("search_docs", {"query": "queues"}, wait=True)
    chain = chain_for(client.identity.tenant_id)
    with superuser(stack) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "DELETE FROM evidence_events WHERE id = (SELECT max(id) FROM evidence_events WHERE chain_id = %s)",
            (chain,),
        )
    report = client.verify_ledger()
    assert not report.ok
    assert any("truncated" in b.problem for b in report.broken)


def test_concurrent_appends_keep_one_unbroken_chain(stack: Stack, token: str) -> None:
    client = stack.client(token)
    tenant = client.identity.tenant_id
    errors: list[BaseException] = []

    def append_many() -> None:
        try:
            for i in range(25):
                with client.plane.sessions() as session:
                    append_events(session, [NewEvent("RunSubmitted", {"i": i}, tenant_id=tenant)])
                    session.commit()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=append_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with client.plane.sessions() as session:
        report = verify_ledger(session, client.plane.keyring(), tenant_id=tenant)
        seqs = list(
            session.scalars(
                select(EvidenceEvent.seq).where(EvidenceEvent.chain_id == chain_for(tenant))
            )
        )
    assert report.ok, report.broken
    assert sorted(seqs) == list(range(1, len(seqs) + 1)) and len(seqs) >= 101


def test_an_append_committed_while_verify_reads_is_not_a_rewritten_chain(
    stack: Stack, token: str
) -> None:
    """The heads and the rows are read in one snapshot: an event committed between the two
    reads belongs to the next verification, and this one stays consistent."""
    from sqlalchemy import event

    client = stack.client(token)
    tenant = client.identity.tenant_id
    with client.plane.sessions() as session:
        append_events(session, [NewEvent("RunSubmitted", {"i": 0}, tenant_id=tenant)])
        session.commit()
    appended: list[bool] = []

    def append_before_the_rows(conn, cursor, statement, *_: object) -> None:  # type: ignore[no-untyped-def]
        if "FROM evidence_events" in statement and "ORDER BY" in statement and not appended:
            appended.append(True)
            with client.plane.sessions() as other:  # another connection, committed now
                append_events(other, [NewEvent("RunSubmitted", {"i": 1}, tenant_id=tenant)])
                other.commit()

    with client.plane.sessions() as session:
        engine = session.get_bind()
        event.listen(engine, "before_cursor_execute", append_before_the_rows)
        try:
            report = verify_ledger(session, client.plane.keyring(), tenant_id=tenant)
        finally:
            event.remove(engine, "before_cursor_execute", append_before_the_rows)
    assert appended, "the rows query was not seen"
    assert report.ok, report.broken
    with client.plane.sessions() as session:  # the next verification sees the new event
        assert verify_ledger(session, client.plane.keyring(), tenant_id=tenant).ok


@pytest.mark.timeout(120)
def test_large_ledger_is_verified_in_parallel_and_names_the_tampered_event(
    stack: Stack, token: str
) -> None:
    from ledger import verify as verify_module

    client = stack.client(token)
    tenant = client.identity.tenant_id
    for batch in range(20):
        with client.plane.sessions() as session:
            append_events(
                session,
                [
                    NewEvent("RunSubmitted", {"batch": batch, "i": i}, tenant_id=tenant)
                    for i in range(500)
                ],
            )
            session.commit()
    assert 10_000 > verify_module.PARALLEL_FROM
    with client.plane.sessions() as session:
        victim = session.scalar(
            select(EvidenceEvent.id).where(
                EvidenceEvent.chain_id == chain_for(tenant), EvidenceEvent.seq == 7777
            )
        )
    with superuser(stack) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "UPDATE evidence_events SET payload = '{\"i\": -1}'::jsonb WHERE id = %s", (victim,)
        )
    report = client.verify_ledger()
    assert report.events >= 10_000
    assert [(b.event_id, b.seq) for b in report.broken] == [(victim, 7777)]
