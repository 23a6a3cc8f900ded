"""Micro-benchmarks of the governed path's parts, on the bench stack's own ledger."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.progress import Progress
from rich.table import Table

from benchmarks import containment
from control.orchestration.dispatch import sign_envelope
from ledger.chain import NewEvent
from ledger.receipts import check_result_message
from ledger.store import append_events
from ledger.verify import verify_ledger
from policy.engine import PolicyRequest
from sandbox_tasks.envelope import verify_envelope
from sandbox_tasks.receipts import build_result, sign_result
from toolplane.messages import now_ms
from toolplane.signing import Ed25519Signer, KeyRing, PublicKey, key_id_for

__all__ = ["run_all", "table"]


def per_call_us(func: Callable[[], Any], *, seconds: float = 1.0) -> float:
    for _ in range(50):
        func()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            func()
        n += 50
    return (time.perf_counter() - start) / n * 1e6


def _signer(owner: str) -> tuple[Ed25519Signer, KeyRing]:
    from datetime import UTC, datetime

    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    signer = Ed25519Signer(private, key_id=key_id_for(owner, public), owner=owner)
    ring = KeyRing(
        [PublicKey(signer.key_id, owner, "ed25519", public, datetime(2000, 1, 1, tzinfo=UTC))]
    )
    return signer, ring


def containment_overhead(settings: Any) -> dict[str, Any]:
    """Per-call cost of each executor (benchmarks.containment), on the bench stack's roots."""
    return containment.measure(settings.repo_root, settings.docs_root)


def run_all(client: Any, *, progress: Progress) -> dict[str, Any]:
    task = progress.add_task("components", total=7)
    plane, out = client.plane, {}
    request = PolicyRequest(
        "t", "p", "submitter", "read_repo_file", "dev", "internal", args={"path": "src/a.py"}
    )
    out["policy_decision_us"] = per_call_us(lambda: plane.policy.decide(request))
    progress.advance(task)

    control, control_ring = _signer("control")
    args = {"path": "src/shipit/deploy.py"}

    def envelope() -> Any:
        return sign_envelope(
            signer=control,
            run_id="r",
            node_id="n",
            attempt=1,
            tenant="t",
            principal="p",
            tool="read_repo_file",
            args=args,
            decision_id="d",
            policy_version="v",
            ttl_s=60,
        )

    signed = envelope()
    body = signed.model_dump(mode="json")
    out["envelope_sign_us"] = per_call_us(envelope)
    out["envelope_verify_us"] = per_call_us(
        lambda: verify_envelope(body, tool="read_repo_file", keys=control_ring, now_ms=now_ms())
    )
    progress.advance(task)

    tool, tool_ring = _signer("tool.read_repo_file")
    content = (plane.settings.repo_root / args["path"]).read_text()
    result = build_result(
        kind="result",
        tool="read_repo_file",
        worker="w",
        started_at=now_ms(),
        envelope=signed.envelope,
        envelope_sha256=signed.digest,
        result={"path": args["path"], "content": content},
        containment="x",
    )
    message = sign_result(result, tool).model_dump(mode="json")
    out["receipt_sign_us"] = per_call_us(lambda: sign_result(result, tool))
    out["receipt_verify_us"] = per_call_us(
        lambda: check_result_message(message, tool_ring, received=datetime.now(UTC))
    )
    progress.advance(task)

    tenant = client.identity.tenant_id
    payload = {"node_id": "n", "note": "append benchmark", "size": len(content), "body": content}
    for batch in (1, 100):
        events, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            with plane.sessions() as session:
                append_events(
                    session,
                    [
                        # a kind no other event must precede (ledger verify checks the
                        # links of decisions, dispatches and results)
                        NewEvent("RunSubmitted", payload, tenant_id=tenant)
                        for _ in range(batch)
                    ],
                )
                session.commit()
            events += batch
        out[f"ledger_append_batch{batch}_events_per_s"] = events / (time.perf_counter() - start)
        progress.advance(task)

    with plane.sessions() as session:
        start = time.perf_counter()
        report = verify_ledger(session, plane.keyring(refresh=True), tenant_id=tenant)
        elapsed = time.perf_counter() - start
    out["ledger_verify_events"] = report.events
    out["ledger_verify_receipts"] = report.receipts
    out["ledger_verify_events_per_s"] = report.events / elapsed
    out["ledger_verify_ok"] = report.ok
    progress.advance(task)
    out.update(containment_overhead(plane.settings))
    progress.advance(task)
    return out


def table(c: dict[str, Any]) -> Table:
    t = Table("component", "measured", title="components")
    t.add_row("policy decision", f"{c['policy_decision_us']:.0f} µs")
    t.add_row(
        "envelope sign / verify", f"{c['envelope_sign_us']:.0f} / {c['envelope_verify_us']:.0f} µs"
    )
    t.add_row(
        "receipt sign / verify", f"{c['receipt_sign_us']:.0f} / {c['receipt_verify_us']:.0f} µs"
    )
    t.add_row(
        "ledger append, 1 event per transaction",
        f"{c['ledger_append_batch1_events_per_s']:.0f} events/s",
    )
    t.add_row(
        "ledger append, 100 events per transaction",
        f"{c['ledger_append_batch100_events_per_s']:.0f} events/s",
    )
    t.add_row(
        "ledger verify",
        f"{c['ledger_verify_events_per_s']:.0f} events/s "
        f"({c['ledger_verify_events']} events, {c['ledger_verify_receipts']} receipts, "
        f"{'ok' if c['ledger_verify_ok'] else 'BROKEN'})",
    )
    return t
