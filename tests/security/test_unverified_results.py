"""Nothing unverified changes state: forged results for a queued node, through the real stack.

Any tool's workers may push onto ``results``. With a repo-review run's ``lint`` node
queued (its worker stopped), messages that name that run, node and attempt but do not
verify, or verify but are not bound to the envelope dispatched for it, leave the node,
the run, the attempt, the tenant's chain and its reservation as they were. Each distinct
message is recorded once, size-capped, as ToolReceiptInvalid on the system chain, and
counted; then the real result arrives and the node completes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import func, select

import celeryconfig
from control.orchestration.ingest import record_unprocessable
from control.orchestration.operations import Operations as Client
from control.orchestration.unverified import MESSAGE_CAP, counts
from ledger.models import Attempt, EvidenceEvent, Node
from sandbox_tasks.receipts import build_result, sign_result
from tests.harness import Stack, wait_for
from toolplane.canonical import digest
from toolplane.keystore import KeyStore
from toolplane.messages import SignedEnvelope, ToolResult

pytestmark = pytest.mark.integration

LINT = "worker-lint_python"
FORGED = {"findings": [], "count": 0, "truncated": False, "ruff_version": "0", "selected": []}


@pytest.fixture(scope="module")
def broker(stack: Stack) -> Celery:
    app = Celery("attacker", set_as_current=False)
    app.conf.update(celeryconfig.build_config(stack.services.redis_url))
    return app


@pytest.fixture
def lint_stopped(stack: Stack) -> Iterator[None]:
    """The lint tool's worker is stopped (its jobs wait in its queue) until the test
    starts it again; it is started again whatever happens."""
    stack.kill(LINT)
    try:
        yield
    finally:
        stack.start_missing()


def push_result(broker: Celery, body: Any) -> None:
    broker.send_task(celeryconfig.INGEST_TASK, args=[body], queue=celeryconfig.RESULTS_QUEUE)


def node_row(client: Client, run_id: str, node_id: str) -> Node:
    with client.plane.sessions() as session:
        node = session.get(Node, (run_id, node_id))
        assert node is not None
        session.expunge(node)
        return node


def signed(result: ToolResult, owner: str, stack: Stack) -> dict[str, Any]:
    signer = KeyStore(stack.home / "keys").signer(owner)
    return sign_result(result, signer).model_dump(mode="json")


def result_for(node: Node, **override: Any) -> ToolResult:
    """A lint result naming ``node``'s run, node and attempt and its envelope's digest."""
    envelope = SignedEnvelope.model_validate(node.envelope)
    built = build_result(
        kind="result",
        tool=node.tool,
        worker="mallory@evil",
        started_at=envelope.envelope.issued_at,
        envelope=envelope.envelope,
        envelope_sha256=envelope.digest,
        result=FORGED,
        containment="none",
    )
    return built.model_copy(update=override)


def invalid_events(client: Client, sha: str) -> list[EvidenceEvent]:
    with client.plane.sessions() as session:
        rows = session.scalars(
            select(EvidenceEvent).where(
                EvidenceEvent.kind == "ToolReceiptInvalid",
                EvidenceEvent.payload["message_sha256"].astext == sha,
            )
        ).all()
        for row in rows:
            session.expunge(row)
        return list(rows)


def tenant_events(client: Client, tenant_id: str) -> int:
    with client.plane.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(EvidenceEvent)
                .where(EvidenceEvent.tenant_id == tenant_id)
            )
        )


def counted(client: Client) -> dict[str, tuple[int, int]]:
    with client.plane.sessions() as session:
        return {c.problem: (c.received, c.recorded) for c in counts(session)}


def test_forged_results_for_a_queued_node_change_nothing_and_are_recorded_once(
    stack: Stack, token: str, broker: Celery, lint_stopped: None
) -> None:
    client = stack.client(token)
    tenant_id = client.identity.tenant_id
    store = client.plane.entitlements
    inputs = {"query": "receipts", "path": "src/shipit/deploy.py"}
    # Another run's lint attempt: an envelope digest dispatched to the right tool.
    earlier = client.submit_workflow("repo-review", inputs)
    run_id = client.submit_workflow("repo-review", inputs)
    for run in (earlier, run_id):
        wait_for(
            lambda run=run: node_row(client, run, "lint").status == "queued",
            timeout=60,
            what=f"{run}'s lint node queued",
        )
    lint = node_row(client, run_id, "lint")
    other_lint = node_row(client, earlier, "lint")
    search = node_row(client, run_id, "search")
    assert lint.attempt == 1 and lint.tool == "lint_python"

    unsigned = {"result": result_for(lint).model_dump(mode="json")}
    # The other tool's key, claiming to be lint_python: the signature does not verify.
    other_key = signed(result_for(lint), "tool.search_docs", stack)
    # The other tool's key, saying so: verifies, but search_docs was not dispatched this.
    other_tool = signed(result_for(lint, tool="search_docs"), "tool.search_docs", stack)
    # lint's own key, naming this node, bound to envelopes dispatched for something else.
    other_run = signed(
        result_for(lint, envelope_sha256=SignedEnvelope.model_validate(other_lint.envelope).digest),
        "tool.lint_python",
        stack,
    )
    other_node = signed(
        result_for(lint, envelope_sha256=SignedEnvelope.model_validate(search.envelope).digest),
        "tool.lint_python",
        stack,
    )
    never_sent = signed(result_for(lint, envelope_sha256="ab" * 32), "tool.lint_python", stack)
    other_attempt = signed(result_for(lint, attempt=2), "tool.lint_python", stack)
    huge = {"result": result_for(lint, result={"filler": "x" * 300_000}).model_dump(mode="json")}
    forged = {
        "unsigned": unsigned,
        "other_key": other_key,
        "other_tool": other_tool,
        "other_run": other_run,
        "other_node": other_node,
        "never_sent": never_sent,
        "other_attempt": other_attempt,
        "huge": huge,
    }
    problems = {
        "unsigned": "malformed",
        "other_key": "signature",
        "other_tool": "unbound",
        "other_run": "unbound",
        "other_node": "unbound",
        "never_sent": "unbound",
        "other_attempt": "unbound",
        "huge": "malformed",
    }
    events_before = tenant_events(client, tenant_id)
    usage_before = store.usage(tenant_id) if store is not None else None
    counted_before = counted(client)

    for body in forged.values():
        push_result(broker, body)
    shas = {name: digest(body) for name, body in forged.items()}
    recorded = {
        name: wait_for(
            lambda sha=sha: invalid_events(client, sha), timeout=30, what=f"{name} recorded"
        )
        for name, sha in shas.items()
    }
    # A replayed copy is counted, not recorded again.
    push_result(broker, unsigned)
    wait_for(
        lambda: (
            counted(client).get("malformed", (0, 0))[0]
            == counted_before.get("malformed", (0, 0))[0] + 3
        ),
        timeout=30,
        what="the replay counted",
    )

    for name, events in recorded.items():
        assert len(invalid_events(client, shas[name])) == 1, name
        (event,) = events
        assert event.chain_id == "system" and event.tenant_id is None and event.run_id is None
        assert event.payload["kind"] == problems[name], (name, event.payload["problem"])
        assert event.payload["claimed"]["run_id"] == run_id  # kept as a claim, nothing more
    assert "signature" in recorded["other_key"][0].payload["problem"]
    big = recorded["huge"][0].payload
    assert big["message_bytes"] > 300_000 and big["message"]["truncated"] is True
    assert len(big["message"]["head"].encode()) <= MESSAGE_CAP
    assert recorded["unsigned"][0].payload["message"] == unsigned  # small: kept whole
    after = counted(client)
    for problem in set(problems.values()):
        names = [n for n, p in problems.items() if p == problem]
        received = len(names) + (problem == "malformed")  # the replayed copy
        before = counted_before.get(problem, (0, 0))
        assert after[problem] == (before[0] + received, before[1] + len(names)), problem

    # Nothing changed: the node, its attempt, the run, the tenant's chain, the reservation.
    now = node_row(client, run_id, "lint")
    assert (now.status, now.attempt, now.result, now.error) == ("queued", 1, None, None)
    with client.plane.sessions() as session:
        attempt = session.get(Attempt, (run_id, "lint", 1))
        assert attempt is not None and attempt.status == "queued" and attempt.settled_at is None
    assert client.run(run_id).status == "running"
    assert client.run(earlier).status == "running"
    assert tenant_events(client, tenant_id) == events_before
    if store is not None:
        assert store.usage(tenant_id) == usage_before

    # The operator reads the counters.
    listed = stack.cli("ledger", "unverified", "--json")
    assert listed.returncode == 0, listed.stderr
    listed_counts = {
        r["problem"]: (r["received"], r["recorded"]) for r in json.loads(listed.stdout)
    }
    assert listed_counts["unbound"] == after["unbound"]

    # The real worker comes back: both runs complete with their own results.
    stack.start_missing()
    for run in (earlier, run_id):
        done = client.wait(run, timeout=90)
        assert done.status == "completed", done.as_dict()
    final = node_row(client, run_id, "lint")
    assert final.receipt is not None and final.receipt["key_id"].startswith("tool.lint_python:")
    assert final.result is not None and final.result["ruff_version"] != "0"
    if store is not None:
        wait_for(lambda: store.usage(tenant_id)["reservations"] == 0, what="settled")
    assert client.verify_ledger().ok
    verified = stack.cli("ledger", "verify", "--json", token=token)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_an_unprocessable_message_is_recorded_once_capped_on_the_system_chain(
    stack: Stack, token: str
) -> None:
    client = stack.client(token)
    raw = {"result": {"run_id": "run_x", "filler": "y" * 50_000}, "nonce": token[-12:]}
    before = counted(client).get("ingest_failed", (0, 0))
    for _ in range(2):
        with client.plane.sessions() as session:
            record_unprocessable(session, raw, RuntimeError("a bug"))
    assert counted(client)["ingest_failed"] == (before[0] + 2, before[1] + 1)
    with client.plane.sessions() as session:
        (event,) = session.scalars(
            select(EvidenceEvent).where(
                EvidenceEvent.kind == "IngestFailed",
                EvidenceEvent.payload["message_sha256"].astext == digest(raw),
            )
        ).all()
        assert event.chain_id == "system" and event.tenant_id is None and event.run_id is None
        assert event.payload["error"] == "RuntimeError: a bug"
        assert event.payload["message"]["truncated"] is True
        assert event.payload["message_bytes"] > 50_000
