"""Attacks on the boundary between the planes, with real workers and a real ledger.

A job pushed straight onto a tool queue without control's signature is refused
and never runs; a result pushed straight onto ``results`` with a forged receipt
changes nothing: it is recorded as ToolReceiptInvalid on the system chain, never
replaces an accepted result, and leaves a queued node waiting for its real one.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

import celeryconfig
from control.orchestration.dispatch import sign_envelope
from control.orchestration.operations import Operations as Client
from control.orchestration.unverified import keep
from ledger.models import EvidenceEvent, Node
from sandbox_tasks.receipts import build_result, sign_result
from tests.harness import Stack, wait_for
from toolplane.canonical import digest
from toolplane.keystore import KeyStore
from toolplane.messages import SignedEnvelope
from toolplane.signing import Ed25519Signer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker(stack: Stack) -> Celery:
    app = Celery("attacker", set_as_current=False)
    app.conf.update(celeryconfig.build_config(stack.services.redis_url))
    return app


def push_job(broker: Celery, queue: str, body: Any) -> None:
    broker.send_task(queue, args=[body], queue=queue, routing_key=queue)


def push_result(broker: Celery, body: Any) -> None:
    broker.send_task(celeryconfig.INGEST_TASK, args=[body], queue=celeryconfig.RESULTS_QUEUE)


def refusal_for(client: Client, received: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        with client.plane.sessions() as session:
            for payload in session.scalars(
                select(EvidenceEvent.payload).where(EvidenceEvent.kind == "JobRefused")
            ):
                if payload["message"]["result"]["envelope_sha256"] == received:
                    return payload
        return None

    return wait_for(find, timeout=30, what=f"JobRefused for {received[:12]}")


def evidence(client: Client, run_id: str, kind: str) -> list[dict[str, Any]]:
    with client.plane.sessions() as session:
        return list(
            session.scalars(
                select(EvidenceEvent.payload).where(
                    EvidenceEvent.run_id == run_id, EvidenceEvent.kind == kind
                )
            )
        )


def unverified(client: Client, message: Any) -> list[dict[str, Any]]:
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


def control_envelope(
    stack: Stack,
    *,
    tool: str,
    args: dict[str, Any],
    ttl_s: int = 60,
    signer: Any = None,
    **overrides: Any,
) -> SignedEnvelope:
    signer = signer or KeyStore(stack.home / "keys").signer("control")
    fields = dict(
        run_id="run_forged",
        node_id=tool,
        attempt=1,
        tenant="tn_x",
        principal="mallory",
        tool=tool,
        args=args,
        decision_id="none",
        policy_version="none",
        ttl_s=ttl_s,
    )
    fields.update(overrides)
    return sign_envelope(signer=signer, **fields)


def started(stack: Stack) -> int:
    """Every job the sleepy worker has started running, from its own log."""
    return stack.log("worker-sleepy").count("job.start job=")


@pytest.mark.parametrize(
    "attack",
    ["unsigned", "garbage", "attacker_key", "tool_key", "expired", "other_tool", "tampered_args"],
)
def test_forged_jobs_are_refused_and_never_run(
    stack: Stack, token: str, broker: Celery, tmp_path: Path, attack: str
) -> None:
    client = stack.client(token)
    args = {"seconds": 0, "tag": attack}
    expected = "envelope_invalid"
    before = started(stack)
    if attack == "unsigned":
        body: Any = {
            "envelope": control_envelope(stack, tool="sleepy", args=args).envelope.model_dump()
        }
    elif attack == "garbage":
        body = {"envelope": {"tool": "sleepy", "args": args}, "signature": "AAAA"}
    elif attack == "attacker_key":
        real = KeyStore(stack.home / "keys").signer("control")
        fake = Ed25519Signer(Ed25519PrivateKey.generate(), key_id=real.key_id, owner="control")
        body = control_envelope(stack, tool="sleepy", args=args, signer=fake).model_dump(
            mode="json"
        )
    elif attack == "tool_key":
        tool_signer = KeyStore(stack.home / "keys").signer("tool.sleepy")
        body = control_envelope(stack, tool="sleepy", args=args, signer=tool_signer).model_dump(
            mode="json"
        )
    elif attack == "expired":
        body = control_envelope(stack, tool="sleepy", args=args, ttl_s=-1).model_dump(mode="json")
        expected = "envelope_expired"
    elif attack == "other_tool":
        body = control_envelope(
            stack, tool="read_repo_file", args={"path": "README.md"}
        ).model_dump(mode="json")
    else:  # tampered_args: a genuine envelope whose args were changed in transit
        body = control_envelope(stack, tool="sleepy", args={"seconds": 0}).model_dump(mode="json")
        body["envelope"]["args"] = args
    push_job(broker, "tool.sleepy", body)
    refused = refusal_for(client, digest(body.get("envelope", body)))
    result = refused["message"]["result"]
    assert result["kind"] == "refusal" and result["ok"] is False
    assert result["error"]["code"] == expected
    assert refused["bound"] is False
    assert refused["message"]["receipt"]["key_id"].startswith("tool.sleepy:")
    assert started(stack) == before  # the tool never ran
    assert client.verify_ledger().ok


def test_an_expired_copy_of_a_job_that_ran_is_called_a_replay(
    stack: Stack, token: str, broker: Celery
) -> None:
    """A copy that arrives after its envelope expired, of a job that did run, must not read
    as "expired" (which says the job never ran and may be retried) but as a replay."""
    client = stack.client(token)
    run_id = f"run_{secrets.token_hex(6)}"
    claim = f"{celeryconfig.claims_prefix('sleepy')}{run_id}/sleepy/1"
    stack.services.redis().set(claim, "done", px=60_000)
    before = started(stack)
    body = control_envelope(
        stack, tool="sleepy", args={"seconds": 0}, run_id=run_id, ttl_s=-1
    ).model_dump(mode="json")
    push_job(broker, "tool.sleepy", body)
    refused = refusal_for(client, digest(body["envelope"]))
    assert refused["message"]["result"]["error"]["code"] == "replay"
    assert started(stack) == before


def test_replayed_job_is_refused_and_does_not_run_again(
    stack: Stack, token: str, broker: Celery, tmp_path: Path
) -> None:
    client = stack.client(token)
    view = client.call("sleepy", {"seconds": 0}, wait=True)
    job = f"{view.run_id}/sleepy/1"
    assert view.status == "completed" and stack.starts("sleepy", job) == 1
    with client.plane.sessions() as session:
        node = session.scalar(select(Node).where(Node.run_id == view.run_id))
        envelope = node.envelope
    push_job(broker, "tool.sleepy", envelope)
    refused = wait_for(lambda: evidence(client, view.run_id, "JobRefused"), what="JobRefused")[0]
    assert refused["bound"] is True and refused["code"] == "replay"
    assert stack.starts("sleepy", job) == 1
    assert client.run(view.run_id).nodes[0].status == "completed"
    assert client.verify_ledger().ok


def forged_result(
    stack: Stack,
    node: Node,
    *,
    result: dict[str, Any],
    key: str = "attacker",
    traceparent: str | None = None,
) -> dict:
    """A result for ``node`` signed by an attacker's key under the tool's key id (with
    ``key="real"``, by the tool's own key: a worker that holds it), claiming
    ``traceparent`` if given."""
    real = KeyStore(stack.home / "keys").signer(f"tool.{node.tool}")
    signer = (
        Ed25519Signer(Ed25519PrivateKey.generate(), key_id=real.key_id, owner=real.owner)
        if key == "attacker"
        else real
    )
    envelope = SignedEnvelope.model_validate(node.envelope)
    built = build_result(
        kind="result",
        tool=node.tool,
        worker="mallory@evil",
        started_at=envelope.envelope.issued_at,
        envelope=envelope.envelope,
        envelope_sha256=envelope.digest,
        result=result,
        containment="none",
        traceparent=traceparent,
    )
    return sign_result(built, signer).model_dump(mode="json")


def test_forged_receipt_for_a_settled_call_never_replaces_it(
    stack: Stack, token: str, broker: Celery
) -> None:
    client = stack.client(token)
    view = client.call("read_repo_file", {"path": "README.md"}, wait=True)
    accepted = view.nodes[0]
    with client.plane.sessions() as session:
        node = session.scalar(select(Node).where(Node.run_id == view.run_id))
    lie = {
        "path": "README.md",
        "content": "rm -rf /",
        "sha256": "0" * 64,
        "size": 8,
        "lines": 1,
        "start_line": 1,
        "end_line": 1,
    }
    forged = forged_result(stack, node, result=lie)
    push_result(broker, forged)
    invalid = wait_for(lambda: unverified(client, forged), what="invalid")
    assert "signature" in invalid[0]["problem"] and invalid[0]["kind"] == "signature"
    assert evidence(client, view.run_id, "ToolReceiptInvalid") == []  # not in the run's trail
    after = client.run(view.run_id).nodes[0]
    assert after.status == "completed" and after.result == accepted.result
    assert after.result_sha256 == accepted.result_sha256
    assert client.verify_ledger().ok


def test_forged_receipt_for_a_queued_call_changes_nothing(
    stack: Stack, token: str, broker: Celery, tmp_path: Path
) -> None:
    """A forged receipt once rejected the queued node (and failed its run): whoever can
    push onto ``results`` could fail any call. Now it changes nothing, and the genuine
    result completes the node."""
    client = stack.client(token)
    view = client.call("sleepy", {"seconds": 2})
    with client.plane.sessions() as session:
        node = session.scalar(select(Node).where(Node.run_id == view.run_id))
    forged = forged_result(stack, node, result={"slept": 0.0, "pid": 1})
    push_result(broker, forged)
    invalid = wait_for(lambda: unverified(client, forged), what="invalid")
    assert "signature" in invalid[0]["problem"]
    final = client.wait(view.run_id, timeout=30)
    assert final.status == "completed"
    assert final.nodes[0].status == "completed" and final.nodes[0].result["pid"] != 1
    assert stack.starts("sleepy", f"{view.run_id}/sleepy/1") == 1
    assert len(evidence(client, view.run_id, "ToolCallCompleted")) == 1
    assert evidence(client, view.run_id, "ToolReceiptInvalid") == []
    assert evidence(client, view.run_id, "ResultIgnored") == []
    assert client.verify_ledger().ok


def test_malformed_results_are_recorded_not_crashing_ingest(
    stack: Stack, token: str, broker: Celery
) -> None:
    client = stack.client(token)
    junks = (
        "hello",
        {"result": {"run_id": 5}},
        {"result": None, "receipt": None},
        [1, 2],
        {"result": {"run_id": "x\x00"}, "receipt": "\x00"},
    )
    for junk in junks:
        push_result(broker, junk)
    # ingest still works afterwards, and recorded the NUL-bearing one it cannot store as is
    assert client.call("search_docs", {"query": "celery"}, wait=True).status == "completed"
    with client.plane.sessions() as session:
        problems = list(
            session.scalars(
                select(EvidenceEvent.payload["problem"].astext).where(
                    EvidenceEvent.kind == "ToolReceiptInvalid"
                )
            )
        )
    assert any("NUL" in p for p in problems)


def test_a_result_with_lone_surrogates_is_recorded_not_retried(
    stack: Stack, token: str, broker: Celery
) -> None:
    """JSON may carry a lone surrogate as an escape; no database column takes it. Such a
    message (in its ids, its key id, its body) is recorded at once as ToolReceiptInvalid,
    with its repr, not retried until it becomes IngestFailed."""
    client = stack.client(token)
    junk = {
        "result": {"run_id": "run_\ud800", "node_id": "n\udfff", "tool": "x", "attempt": 1},
        "receipt": {"key_id": "tool.x:\ud800", "algorithm": "ed25519", "signature": "AA"},
    }
    push_result(broker, junk)
    sha = keep(junk).sha256

    def recorded() -> list[tuple[str, dict[str, Any]]]:
        with client.plane.sessions() as session:
            rows = session.execute(
                select(EvidenceEvent.kind, EvidenceEvent.payload).where(
                    EvidenceEvent.payload["message_sha256"].astext == sha
                )
            )
            return [(kind, payload) for kind, payload in rows]

    ((kind, payload),) = wait_for(recorded, timeout=20, what="the surrogate message recorded")
    assert kind == "ToolReceiptInvalid" and payload["kind"] == "malformed"
    assert payload["claimed"]["run_id"] is None and "\\ud800" in payload["message"]["head"]


def test_results_replayed_twice_are_accepted_once(stack: Stack, token: str, broker: Celery) -> None:
    client = stack.client(token)
    view = client.call("read_repo_file", {"path": "README.md"}, wait=True)
    with client.plane.sessions() as session:
        completed = session.scalar(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == view.run_id, EvidenceEvent.kind == "ToolCallCompleted"
            )
        )
    for _ in range(3):
        push_result(broker, completed["message"])
    marker = client.call(
        "search_docs", {"query": "ledger"}, wait=True
    )  # ingest has moved past them
    assert marker.status == "completed"
    assert len(evidence(client, view.run_id, "ToolCallCompleted")) == 1


def test_a_refusal_binds_to_its_node_by_the_digest_of_what_was_received(
    stack: Stack, token: str, broker: Celery
) -> None:
    """A worker that cannot verify an envelope (say, a control key it was not given)
    trusts none of its ids; its refusal names the digest, and the node fails at once."""
    client = stack.client(token)
    view = client.call("sleepy", {"seconds": 3})
    with client.plane.sessions() as session:
        node = session.scalar(select(Node).where(Node.run_id == view.run_id))
    signed = SignedEnvelope.model_validate(node.envelope)
    refusal = build_result(
        kind="refusal",
        tool="sleepy",
        worker="w@h",
        started_at=signed.envelope.issued_at,
        envelope=None,
        envelope_sha256=signed.digest,
        error=("envelope_invalid", "envelope signature: unknown key id"),
        containment="bwrap",
    )
    signer = KeyStore(stack.home / "keys").signer("tool.sleepy")
    push_result(broker, sign_result(refusal, signer).model_dump(mode="json"))
    final = client.wait(view.run_id, timeout=30)
    assert final.status == "failed"
    assert final.nodes[0].error["code"] == "envelope_invalid"
    refused = evidence(client, view.run_id, "JobRefused")
    assert refused and refused[0]["bound"] is True
