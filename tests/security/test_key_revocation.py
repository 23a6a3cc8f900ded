"""Keys judged by when they are received, against the real stack.

An attacker here holds a key that was retired or revoked (its private file is still
in the stack's key store, as a stolen copy would be) and can push onto the queues.
Each test rotates or revokes the keys it attacks with ``toolplane keys``, as an
operator would, while the control process and the workers keep running: they must
see the change at their next message, without a restart. Where a key must have been
retired longer ago than its grace (two hours), the test moves that key's retirement
back in the key store's index instead of waiting: the processes cannot be given a
clock, but they read the index.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from sqlalchemy import select, text

import celeryconfig
from control.orchestration.dispatch import sign_envelope
from ledger.models import EvidenceEvent, Node
from sandbox_tasks.receipts import build_result, sign_result
from tests.harness import (
    Services,
    Stack,
    _libpq,
    own_services,
    start_stack,
    stop_stack,
    wait_for,
)
from toolplane.canonical import digest
from toolplane.keystore import KeyStore
from toolplane.lifetimes import RETIRED_KEY_GRACE
from toolplane.messages import SignedEnvelope, now_ms, signed_bytes
from toolplane.signing import Signer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker(stack: Stack) -> Celery:
    app = Celery("attacker", set_as_current=False)
    app.conf.update(celeryconfig.build_config(stack.services.redis_url))
    return app


def keys(stack: Stack) -> KeyStore:
    return KeyStore(stack.home / "keys")


def cli_json(stack: Stack, *args: str) -> Any:
    done = stack.cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def revoke(stack: Stack, key_id: str, reason: str) -> dict[str, Any]:
    return cli_json(stack, "keys", "revoke", key_id, "--reason", reason)


def push(broker: Celery, task: str, queue: str, body: Any) -> None:
    broker.send_task(task, args=[body], queue=queue, routing_key=queue)


def envelope(signer: Signer, *, run_id: str | None = None, **claims: int) -> dict[str, Any]:
    """A sleepy job signed with ``signer``; ``claims`` overrides issued_at/expires_at."""
    signed = sign_envelope(
        signer=signer,
        run_id=run_id or f"run_{secrets.token_hex(6)}",
        node_id="sleepy",
        attempt=1,
        tenant="tn_x",
        principal="mallory",
        tool="sleepy",
        args={"seconds": 0},
        decision_id="none",
        policy_version="none",
        ttl_s=600,
    )
    if claims:
        forged = signed.envelope.model_copy(update=claims)
        signed = SignedEnvelope(envelope=forged, signature=signer.sign(signed_bytes(forged)))
    return signed.model_dump(mode="json")


def refusal(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The JobRefused evidence of what was pushed (found by the digest of what was received)."""
    received = digest(body["envelope"])

    def find() -> dict[str, Any] | None:
        with client.plane.sessions() as session:
            for payload in session.scalars(
                select(EvidenceEvent.payload).where(EvidenceEvent.kind == "JobRefused")
            ):
                if payload["message"]["result"]["envelope_sha256"] == received:
                    return payload
        return None

    # a sleepy job of an earlier test may still hold the worker (up to its 8 s limit)
    return wait_for(find, timeout=60, what=f"JobRefused for {received[:12]}")


def evidence(client: Any, run_id: str, kind: str) -> list[dict[str, Any]]:
    with client.plane.sessions() as session:
        return list(
            session.scalars(
                select(EvidenceEvent.payload).where(
                    EvidenceEvent.run_id == run_id, EvidenceEvent.kind == kind
                )
            )
        )


def unverified(client: Any, message: Any) -> list[dict[str, Any]]:
    """ToolReceiptInvalid recorded for ``message``: on the system chain, by its digest."""
    with client.plane.sessions() as session:
        return list(
            session.scalars(
                select(EvidenceEvent.payload).where(
                    EvidenceEvent.kind == "ToolReceiptInvalid",
                    EvidenceEvent.chain_id == "system",
                    EvidenceEvent.payload["message_sha256"].astext == digest(message),
                )
            )
        )


def queued_node(client: Any, run_id: str) -> Node:
    with client.plane.sessions() as session:
        return session.scalar(select(Node).where(Node.run_id == run_id))


def result_for(node: Node, signer: Signer, **claims: int) -> dict[str, Any]:
    """A result for ``node`` as its worker would report it, signed with ``signer``."""
    signed = SignedEnvelope.model_validate(node.envelope)
    built = build_result(
        kind="result",
        tool=node.tool,
        worker="mallory@evil",
        started_at=signed.envelope.issued_at,
        envelope=signed.envelope,
        envelope_sha256=signed.digest,
        result={"slept": 0.0, "pid": 1},
        containment="none",
    )
    if claims:
        built = built.model_copy(update=claims)
    return sign_result(built, signer).model_dump(mode="json")


def jobs_started(stack: Stack) -> int:
    return stack.log("worker-sleepy").count("job.start job=")


def test_a_revoked_control_key_is_refused_by_a_real_worker(
    stack: Stack, token: str, broker: Celery
) -> None:
    client = stack.client(token)
    # The worker has run jobs under this key: it must notice the revocation, not a restart.
    assert client.call("sleepy", {"seconds": 0}, wait=True).status == "completed"
    old = keys(stack).signer("control")
    before_revocation = envelope(old)  # signed now, received after the revocation
    revoked = revoke(stack, old.key_id, "test: the control key leaked")
    assert revoked["key_id"] == old.key_id and revoked["already_revoked"] is False
    assert revoked["replacement"] and revoked["replacement"].startswith("control:")
    revoked_at = datetime.fromisoformat(revoked["revoked_at"])
    after = envelope(old)
    backdated = envelope(  # signed after the revocation, claiming an hour before it
        old,
        issued_at=int((revoked_at - timedelta(hours=1)).timestamp() * 1000),
        expires_at=int((revoked_at + timedelta(minutes=10)).timestamp() * 1000),
    )
    started = jobs_started(stack)
    for body in (before_revocation, after, backdated):
        push(broker, "tool.sleepy", "tool.sleepy", body)
    for body in (before_revocation, after, backdated):
        result = refusal(client, body)["message"]["result"]
        assert result["kind"] == "refusal" and result["error"]["code"] == "envelope_invalid"
        assert "revoked" in result["error"]["message"] and old.key_id in result["error"]["message"]
    assert jobs_started(stack) == started  # none of them ran

    # The ledger has it, `keys list` shows it, and a second revocation records nothing.
    with client.plane.sessions() as session:
        recorded = list(
            session.scalars(
                select(EvidenceEvent.payload).where(
                    EvidenceEvent.kind == "KeyRevoked",
                    EvidenceEvent.payload["key_id"].astext == old.key_id,
                )
            )
        )
    assert [(r["reason"], r["by"], r["owner"]) for r in recorded] == [
        ("test: the control key leaked", "keys revoke", "control")
    ]
    listed = {k["key_id"]: k for k in cli_json(stack, "keys", "list")}
    assert listed[old.key_id]["revoked_reason"] == "test: the control key leaked"
    assert listed[revoked["replacement"]]["revoked_at"] is None
    again = revoke(stack, old.key_id, "once more")
    assert again["already_revoked"] is True and again["reason"] == "test: the control key leaked"
    human = stack.cli("keys", "list")
    assert f"{old.key_id}  ed25519  REVOKED" in human.stdout
    unknown = stack.cli("keys", "revoke", "control:0000000000000000", "--reason", "x")
    assert unknown.returncode == 2 and "KEY_ID: no key 'control:0000000000000000'" in unknown.stderr

    # The planes follow without a restart: the control process signs the workflow's last
    # node (dispatched when the first two complete) with the replacement, and it runs.
    view = client.run_workflow(
        "repo-review", {"query": "receipts", "path": "src/shipit/deploy.py"}, wait=True
    )
    assert view.status == "completed", view.as_dict()
    with client.plane.sessions() as session:
        signed_by = {
            n.node_id: n.envelope["envelope"]["key_id"]
            for n in session.scalars(select(Node).where(Node.run_id == view.run_id))
        }
    assert signed_by == dict.fromkeys(("search", "read", "lint"), revoked["replacement"])


def test_a_receipt_under_a_revoked_tool_key_changes_nothing(
    stack: Stack, token: str, broker: Celery
) -> None:
    client = stack.client(token)
    earlier = client.call("sleepy", {"seconds": 0}, wait=True)  # evidence before the revocation
    assert earlier.status == "completed"
    old = keys(stack).signer("tool.sleepy")
    assert earlier.nodes[0].receipt["key_id"] == old.key_id
    revoked = revoke(stack, old.key_id, "test: the sleepy key leaked")

    view = client.call("sleepy", {"seconds": 3})
    forged = result_for(queued_node(client, view.run_id), old)
    push(broker, celeryconfig.INGEST_TASK, celeryconfig.RESULTS_QUEUE, forged)
    (invalid,) = wait_for(lambda: unverified(client, forged), timeout=30, what="invalid")
    assert "revoked" in invalid["problem"] and old.key_id in invalid["problem"]
    # It changed nothing: the real worker, not restarted, signed its own result with the
    # replacement key, and that result completes the node.
    final = client.wait(view.run_id, timeout=30)
    assert final.status == "completed" and final.nodes[0].status == "completed"
    assert final.nodes[0].receipt["key_id"] == revoked["replacement"]
    assert evidence(client, view.run_id, "ToolReceiptInvalid") == []

    # What the key signed before its revocation still verifies, in process and by the CLI.
    assert client.verify_ledger().ok
    verified = stack.cli("ledger", "verify", "--json", token=token)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["receipts_verified"] >= 2


def test_a_retired_keys_work_in_flight_is_accepted_within_the_grace(
    stack: Stack, token: str, broker: Celery
) -> None:
    client = stack.client(token)
    old_control, old_tool = keys(stack).signer("control"), keys(stack).signer("tool.sleepy")
    in_flight = envelope(old_control)  # signed before the rotation, received after it
    # its envelope too; 6 s: two `keys rotate` processes run before the push (on a loaded
    # machine they took over 3 s, and the real result won the race)
    view = client.call("sleepy", {"seconds": 6})
    cli_json(stack, "keys", "rotate", "control")
    cli_json(stack, "keys", "rotate", "sleepy")

    # A result the worker signed with the old tool key (before it saw the rotation) arrives
    # after it: accepted, before the real worker's own result (6 s) is in.
    push(
        broker,
        celeryconfig.INGEST_TASK,
        celeryconfig.RESULTS_QUEUE,
        result_for(queued_node(client, view.run_id), old_tool),
    )
    final = client.wait(view.run_id, timeout=30)
    assert final.status == "completed"
    assert final.nodes[0].receipt["key_id"] == old_tool.key_id
    (accepted,) = evidence(client, view.run_id, "ToolCallCompleted")
    assert accepted["receipt_key_id"] == old_tool.key_id

    # A job whose envelope the old control key signed is taken after the rotation: it runs.
    push(broker, "tool.sleepy", "tool.sleepy", in_flight)
    job = in_flight["envelope"]["job_id"]
    wait_for(lambda: stack.starts("sleepy", job) == 1, timeout=30, what="the in-flight job ran")
    assert client.verify_ledger().ok


def retire_long_ago(stack: Stack, key_ids: list[str]) -> datetime:
    """Move these retired keys' retirement back past their grace, in the key store's index
    (where the control reads it; the workers read their copies of it, written again here as
    `toolplane keys` does: control.ops.identities) and in the ledger's key table."""
    from control.ops.identities import refresh_worker_keys

    store = keys(stack)
    retired = datetime.fromisoformat(
        next(e["not_after"] for e in store.entries() if e["key_id"] == key_ids[0])
    ) - (RETIRED_KEY_GRACE + timedelta(minutes=1))
    index = json.loads(store.index_path.read_text())
    for entry in index["keys"]:
        if entry["key_id"] in key_ids:
            entry["not_after"] = retired.isoformat()
    tmp = store.index_path.with_suffix(".test")
    tmp.write_text(json.dumps(index))
    tmp.replace(store.index_path)
    refresh_worker_keys(stack.settings())
    return retired


@pytest.fixture
def quiet(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Celery]]:
    """A stack of its own, with one sleepy worker: no earlier test's jobs ahead of ours (in
    the shared stack, cancelled runs' sleepy jobs held the worker past the wait, seen in CI)."""
    own = own_services(services)
    running = start_stack(own, Path(tmp_path_factory.mktemp("backdating")), workers={"sleepy": 1})
    app = Celery("attacker", set_as_current=False)
    app.conf.update(celeryconfig.build_config(own.redis_url))
    try:
        yield running, app
    finally:
        stop_stack(running)
        own.close()


def test_backdating_into_a_rotated_keys_old_window_is_refused(
    quiet: tuple[Stack, Celery],
) -> None:
    stack, broker = quiet
    client = stack.client(stack.tenant())
    # Keys that sign nothing before they are retired: the history of others stays as it was.
    cli_json(stack, "keys", "rotate", "control")
    cli_json(stack, "keys", "rotate", "sleepy")
    old_control, old_tool = keys(stack).signer("control"), keys(stack).signer("tool.sleepy")
    cli_json(stack, "keys", "rotate", "control")
    cli_json(stack, "keys", "rotate", "sleepy")
    retired = retire_long_ago(stack, [old_control.key_id, old_tool.key_id])
    in_old_window = int((retired - timedelta(minutes=5)).timestamp() * 1000)

    honest = envelope(old_control)
    backdated = envelope(old_control, issued_at=in_old_window, expires_at=in_old_window + 600_000)
    queued = stack.services.redis()  # earlier tests' sleepy jobs (cancelled runs') drain first
    wait_for(lambda: queued.llen("tool.sleepy") == 0, timeout=60, what="tool.sleepy to drain")
    started = jobs_started(stack)
    for body in (honest, backdated):
        push(broker, "tool.sleepy", "tool.sleepy", body)
    for body in (honest, backdated):
        result = refusal(client, body)["message"]["result"]
        assert result["error"]["code"] == "envelope_invalid"
        assert "grace ended" in result["error"]["message"]
    assert jobs_started(stack) == started

    view = client.call("sleepy", {"seconds": 3})
    forged = result_for(
        queued_node(client, view.run_id),
        old_tool,
        started_at=in_old_window,
        finished_at=in_old_window + 1,
        duration_ms=1,
    )
    push(broker, celeryconfig.INGEST_TASK, celeryconfig.RESULTS_QUEUE, forged)
    (invalid,) = wait_for(lambda: unverified(client, forged), timeout=30, what="invalid")
    assert "grace ended" in invalid["problem"] and old_tool.key_id in invalid["problem"]
    final = client.wait(view.run_id, timeout=60)  # the real worker's own result
    assert final.nodes[0].status == "completed"
    assert final.nodes[0].receipt["key_id"] != old_tool.key_id


@pytest.mark.parametrize(
    ("claims", "rule"),
    [
        ({"lifetime_ms": 3_600_001}, "over the bound of 3600000 ms"),
        ({"lifetime_ms": 48 * 3_600_000, "back_ms": 24 * 3_600_000}, "over the bound"),
        ({"ahead_ms": 5 * 60_000}, "in the future"),
    ],
)
def test_envelopes_over_the_lifetime_bound_or_from_the_future_are_refused(
    stack: Stack, token: str, broker: Celery, claims: dict[str, int], rule: str
) -> None:
    client = stack.client(token)
    issued = now_ms() - claims.get("back_ms", 0) + claims.get("ahead_ms", 0)
    body = envelope(
        keys(stack).signer("control"),
        issued_at=issued,
        expires_at=issued + claims.get("lifetime_ms", 600_000),
    )
    started = jobs_started(stack)
    push(broker, "tool.sleepy", "tool.sleepy", body)
    result = refusal(client, body)["message"]["result"]
    assert result["error"]["code"] == "envelope_invalid" and rule in result["error"]["message"]
    assert jobs_started(stack) == started


def test_no_sync_or_rotation_ever_un_revokes_a_key(stack: Stack) -> None:
    store = keys(stack)
    old = store.signer("tool.search_docs").key_id
    cli_json(stack, "keys", "rotate", "search_docs")
    before = store.index_path.read_text()  # a backup taken before the revocation
    revoke(stack, old, "test: restored from a backup")
    store.index_path.write_text(before)  # the backup comes back
    assert store.entry(old).get("revoked_at") is None

    migrated = stack.cli("migrate")  # syncs the key store and the ledger's key table
    assert migrated.returncode == 0, migrated.stderr
    assert store.entry(old)["revoked_reason"] == "test: restored from a backup"
    cli_json(stack, "keys", "rotate", "search_docs")
    assert store.entry(old)["revoked_reason"] == "test: restored from a backup"

    with psycopg.connect(_libpq(stack.env["TOOLPLANE_DATABASE_URL"])) as conn:
        row = conn.execute(
            "SELECT revoked_at FROM signing_keys WHERE key_id = %s", (old,)
        ).fetchone()
        assert row is not None and row[0] is not None
        for statement in (
            "UPDATE signing_keys SET revoked_at = NULL WHERE key_id = %s",
            "UPDATE signing_keys SET revoked_at = revoked_at + interval '1 day' WHERE key_id = %s",
            "DELETE FROM signing_keys WHERE key_id = %s",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="signing key"):
                conn.execute(statement, (old,))
            conn.rollback()


def test_a_revocation_waits_for_an_ingest_that_is_judging_the_key(stack: Stack, token: str) -> None:
    """Ingest locks the key's row, then reads its clock; a revocation locks it, then reads
    its own: the receipt ingest accepts is never newer than the revocation the ledger has."""
    from control.governance.keys import judge_key, revoke_key

    plane = stack.client(token).plane
    store = keys(stack)
    old = store.signer("tool.lint_python").key_id
    cli_json(stack, "keys", "rotate", "lint_python")
    plane.sync_keys()
    ring = plane.keyring(refresh=True)
    done: dict[str, Any] = {}
    with plane.sessions() as ingest:
        judged, at = judge_key(ingest, ring, old)
        assert judged.get(old) is not None and judged.get(old).accepts_at(at)
        revoking = threading.Thread(
            target=lambda: done.update(r=revoke_key(plane.sessions, store, old, reason="race"))
        )
        revoking.start()

        def blocked() -> int:  # a transaction of its own each time: a fresh view of activity
            with plane.sessions() as watcher:
                return int(
                    watcher.scalar(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND datname = current_database() AND query ILIKE '%signing_keys%'"
                        )
                    )
                    or 0
                )

        wait_for(blocked, timeout=10, what="the revocation to wait for the ingest's lock")
        assert "r" not in done
        ingest.commit()
    revoking.join(timeout=30)
    assert done["r"].revoked_at > at
    with plane.sessions() as later:
        judged, now = judge_key(later, ring, old)  # the cached ring did not know it: the row did
        assert ring.get(old).revoked_at is None
        assert "revoked" in (judged.get(old).refusal_at(now) or "")
