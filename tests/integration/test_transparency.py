"""Checkpoints, offline bundles and tampering, against the real stack.

A call runs through the control and a worker; the operator signs a checkpoint; the run's
bundle, exported through the API, verifies in a process with no settings at all, and
fails naming the part when any byte of it is flipped. A superuser who rewrites a
PolicyDecision and rehashes the chain after it, or deletes the newest events and
rewinds the head, is named by `ledger verify` against the checkpoint, and the control
refuses to checkpoint the rewritten log."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger.bundle_check import check_bundle
from ledger.chain import chain_for, event_hash
from ledger.note import NoteVerifier, generate_signer
from tests.harness import REPO, Stack, _libpq

pytestmark = pytest.mark.integration


def offline(*args: str) -> subprocess.CompletedProcess[str]:
    """``toolplane`` with no TOOLPLANE_* setting, no database, broker or API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLPLANE_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "control.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def one_call(stack: Stack, token: str) -> str:
    run = stack.http(token).call("read_repo_file", {"path": "README.md"}, wait=True)
    assert run.status == "completed", run
    return str(run.run_id)


def checkpoint(stack: Stack, chain: str) -> dict[str, Any]:
    """`toolplane ledger checkpoint` (every chain; other tests' chains may be refused, as
    they were tampered with): what it did for ``chain``."""
    done = stack.cli("ledger", "checkpoint", "--json")
    out = json.loads(done.stdout)
    assert done.returncode == (1 if out["refused"] else 0), done.stderr
    signed = [s for s in out["signed"] if s["chain_id"] == chain]
    refused = [r for r in out["refused"] if r["chain_id"] == chain]
    assert len(signed + refused) == 1, out
    return (signed + refused)[0]


def chain_of(stack: Stack, token: str) -> str:
    return chain_for(stack.client(token).identity.tenant_id)


@pytest.fixture
def exported(stack: Stack, token: str, tmp_path: Path) -> dict[str, Any]:
    run_id = one_call(stack, token)
    assert "size" in checkpoint(stack, chain_of(stack, token))
    bundle = tmp_path / "run.bundle.json"
    done = stack.cli("ledger", "export", run_id, "--out", str(bundle), token=token)
    assert done.returncode == 0, done.stderr
    trust = tmp_path / "trust.json"
    done = stack.cli("ledger", "trust", "--out", str(trust))
    assert done.returncode == 0, done.stderr
    return {"run_id": run_id, "bundle": bundle, "trust": trust}


def test_bundle_verifies_offline(exported: dict[str, Any]) -> None:
    done = offline(
        "ledger",
        "verify-bundle",
        str(exported["bundle"]),
        "--trust",
        str(exported["trust"]),
        "--json",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["run_id"] == exported["run_id"]
    assert report["events"] >= 4 and report["receipts_verified"] == 1
    assert report["envelopes_verified"] == 1 and report["notes"] == []
    trust = json.loads(exported["trust"].read_text())
    name = NoteVerifier.parse(trust["checkpoint_keys"][0]).name
    wrong = generate_signer(name).verifier.vkey  # the same name, another key
    done = offline("ledger", "verify-bundle", str(exported["bundle"]), "--key", wrong)
    assert done.returncode == 1 and "checkpoint: note: signed by no trusted key" in done.stdout


def _spans(data: bytes, bundle: dict[str, Any]) -> list[tuple[int, int, str]]:
    """Where each part's value sits in the file, and the prefix its problem must have."""
    spans, cursor = [], data.index(b'"events":')
    for i, event in enumerate(bundle["events"]):  # in order: leaf, proof, seq
        for value in [event["leaf"], *event["proof"]]:
            at = cursor = data.index(value.encode(), cursor)
            spans.append((at, at + len(value), f"events[{i}]"))
    note = json.dumps(bundle["checkpoint"], ensure_ascii=False)[1:-1].encode()
    at = data.index(note)
    spans.append((at, at + len(note), "checkpoint"))
    return spans


def test_any_flipped_byte_fails_naming_the_part(exported: dict[str, Any]) -> None:
    data = exported["bundle"].read_bytes()
    bundle = json.loads(data)
    trust = json.loads(exported["trust"].read_text())
    verifiers = [NoteVerifier.parse(v) for v in trust["checkpoint_keys"]]
    assert check_bundle(data, verifiers, trust["keys"]).ok
    spans = _spans(data, bundle)
    rng = random.Random(17)
    positions = sorted(
        set(rng.sample(range(len(data)), min(len(data), 1500)))
        | {s for s, _, _ in spans}
        | {e - 1 for _, e, _ in spans}
    )
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        report = check_bundle(bytes(flipped), verifiers, trust["keys"])
        assert not report.ok, f"byte {pos} flipped and the bundle still verifies"
        for start, end, part in spans:
            if start <= pos < end:
                named = [p for p in report.problems if p.startswith((part, "bundle:"))]
                assert named, (pos, part, report.problems)


def superuser(stack: Stack) -> psycopg.Connection[Any]:
    return psycopg.connect(_libpq(stack.services.database_url), autocommit=True)


def test_rewritten_decision_is_named_and_not_checkpointed(stack: Stack, token: str) -> None:
    run_id = one_call(stack, token)
    chain = chain_of(stack, token)
    assert "size" in checkpoint(stack, chain)
    with superuser(stack) as conn:
        rows = conn.execute(
            "SELECT id, seq, prev_hash, kind, tenant_id, run_id, created_at, payload"
            " FROM evidence_events WHERE chain_id = %s ORDER BY seq",
            (chain,),
        ).fetchall()
        first = next(i for i, r in enumerate(rows) if r[3] == "PolicyDecision" and r[5] == run_id)
        conn.execute("SET session_replication_role = replica")
        prev = rows[first][2]
        for row_id, seq, _prev, kind, tenant_id, row_run, created_at, payload in rows[first:]:
            if row_id == rows[first][0]:
                payload["policies"] = ["forged-allow"]
            new = event_hash(
                chain_id=chain,
                seq=seq,
                prev_hash=prev,
                kind=kind,
                tenant_id=tenant_id,
                run_id=row_run,
                created_at=created_at,
                payload=payload,
            )
            conn.execute(
                "UPDATE evidence_events SET payload = %s::jsonb, prev_hash = %s, hash = %s"
                " WHERE id = %s",
                (json.dumps(payload), prev, new, row_id),
            )
            prev = new
        conn.execute("UPDATE chain_heads SET hash = %s WHERE chain_id = %s", (prev, chain))
    done = stack.cli("ledger", "verify", "--json", token=token)
    report = json.loads(done.stdout)
    assert done.returncode == 1, report
    problems = [b["problem"] for b in report["broken"]]
    assert len(problems) == 1 and "does not match the signed checkpoint" in problems[0], problems
    one_call(stack, token)  # new events after the rewrite: the tree cannot take them
    assert "prev_hash does not link" in checkpoint(stack, chain)["problem"]


def test_rewound_log_is_named_and_not_checkpointed(stack: Stack, token: str) -> None:
    one_call(stack, token)
    one_call(stack, token)
    chain = chain_of(stack, token)
    assert "size" in checkpoint(stack, chain)
    with superuser(stack) as conn:
        (last,) = conn.execute(
            "SELECT max(seq) FROM evidence_events WHERE chain_id = %s", (chain,)
        ).fetchone()
        keep = last - 3
        (keep_hash,) = conn.execute(
            "SELECT hash FROM evidence_events WHERE chain_id = %s AND seq = %s", (chain, keep)
        ).fetchone()
        conn.execute("SET session_replication_role = replica")
        conn.execute("DELETE FROM evidence_events WHERE chain_id = %s AND seq > %s", (chain, keep))
        conn.execute(
            "UPDATE chain_heads SET seq = %s, hash = %s WHERE chain_id = %s",
            (keep, keep_hash, chain),
        )
        # and the tree's own tables, rebuilt as if the log had always been this long
        conn.execute("DELETE FROM merkle_nodes WHERE chain_id = %s", (chain,))
        conn.execute("DELETE FROM merkle_trees WHERE chain_id = %s", (chain,))
    done = stack.cli("ledger", "verify", "--json", token=token)
    report = json.loads(done.stdout)
    assert done.returncode == 1
    assert [b["problem"] for b in report["broken"]] == [
        f"log shorter than its checkpoint: checkpoint size {last}, table ends at seq {keep}"
    ], report
    human = stack.cli("ledger", "verify", token=token)
    assert f"chain {chain}: log shorter than its checkpoint" in human.stdout
    assert f"log has {keep} leaves, its checkpoint {last}" in checkpoint(stack, chain)["problem"]


def test_leaf_bytes_are_what_the_event_hash_covers(exported: dict[str, Any], stack: Stack) -> None:
    bundle = json.loads(exported["bundle"].read_bytes())
    leaves = [base64.b64decode(e["leaf"]) for e in bundle["events"]]
    import hashlib

    with superuser(stack) as conn:
        for event, leaf in zip(bundle["events"], leaves, strict=True):
            parsed = json.loads(leaf)
            (stored,) = conn.execute(
                "SELECT hash FROM evidence_events WHERE chain_id = %s AND seq = %s",
                (parsed["chain_id"], event["seq"]),
            ).fetchone()
            assert hashlib.sha256(leaf).hexdigest() == stored


def test_a_key_inserted_into_the_database_verifies_nothing(stack: Stack, token: str) -> None:
    """Trust is the key store's: a receipt signed by a key someone put in `signing_keys`
    is named by `ledger verify` (it passed before, ok: true)."""
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from sqlalchemy import select

    from ledger.chain import NewEvent
    from ledger.models import EvidenceEvent, SigningKey
    from ledger.store import append_events
    from toolplane.canonical import digest
    from toolplane.messages import ResultMessage, signed_bytes

    run_id = one_call(stack, token)
    client = stack.client(token)
    forger = Ed25519PrivateKey.generate()
    public = forger.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = "tool.read_repo_file:f0f0f0f0f0f0f0f0"
    with client.plane.sessions() as session:
        payload = session.execute(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == run_id, EvidenceEvent.kind == "ToolCallCompleted"
            )
        ).scalar_one()
        message = ResultMessage.model_validate(payload["message"])
        content = dict(message.result.result or {}, content="forged")
        result = message.result.model_copy(
            update={"result": content, "result_sha256": digest(content)}
        )
        signature = base64.b64encode(forger.sign(signed_bytes(result))).decode()
        forged = {
            "result": result.model_dump(mode="json"),
            "receipt": {"key_id": key_id, "algorithm": "ed25519", "signature": signature},
        }
        session.add(
            SigningKey(
                key_id=key_id,
                owner="tool.read_repo_file",
                algorithm="ed25519",
                public_key=base64.b64encode(public).decode(),
                not_before=datetime(2020, 1, 1, tzinfo=UTC),
            )
        )
        append_events(
            session,
            [
                NewEvent(
                    "ToolCallCompleted",
                    dict(payload, message=forged, receipt_key_id=key_id),
                    client.identity.tenant_id,
                    run_id,
                )
            ],
        )
        session.commit()
    done = stack.cli("ledger", "verify", "--json", token=token)
    report = json.loads(done.stdout)
    assert done.returncode == 1, report
    problems = [b["problem"] for b in report["broken"]]
    assert problems == [f"receipt: receipt signature: unknown key id {key_id!r}"], problems


def test_checkpoint_on_demand_through_the_api(stack: Stack, token: str) -> None:
    """The control process signs (as its runtime database role) for an admin; anyone of
    the tenant reads the newest checkpoint; a submitter may not sign."""
    import httpx

    one_call(stack, token)
    headers = {"Authorization": f"Bearer {token}"}
    answer = httpx.post(f"{stack.url}/v1/ledger/checkpoint", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    signed = answer.json()
    assert signed["origin"] == "toolplane.local/" + signed["chain_id"].replace(":", "/")
    latest = httpx.get(f"{stack.url}/v1/ledger/checkpoint", headers=headers, timeout=30)
    assert latest.status_code == 200 and latest.text == signed["note"]
    assert latest.text.splitlines()[1] == str(signed["size"])
    submitter = stack.http(token).issue_token(principal="bot", role="submitter")
    answer = httpx.post(
        f"{stack.url}/v1/ledger/checkpoint",
        headers={"Authorization": f"Bearer {submitter.token}"},
        timeout=30,
    )
    assert answer.status_code == 403, answer.text


def test_forged_approval_and_dispatch_are_named(stack: Stack, token: str) -> None:
    """Events appended with a valid chain but no history behind them: an ApprovalGranted
    never requested, and a dispatch under a decision that denied (ok: true before)."""
    from sqlalchemy import select

    from ledger.chain import NewEvent
    from ledger.models import EvidenceEvent
    from ledger.store import append_events

    run_id = one_call(stack, token)
    client = stack.client(token)
    tenant = client.identity.tenant_id
    with client.plane.sessions() as session:
        events = dict(
            session.execute(
                select(EvidenceEvent.kind, EvidenceEvent.payload).where(
                    EvidenceEvent.run_id == run_id,
                    EvidenceEvent.kind.in_(["PolicyDecision", "ToolCallDispatched"]),
                )
            ).all()
        )
        decision, dispatched = events["PolicyDecision"], events["ToolCallDispatched"]
        node = decision["node_id"]
        append_events(
            session,
            [
                NewEvent(
                    "ApprovalGranted",
                    {"approval_id": "ap_forged", "node_id": node, "by": "mallory",
                     "token_id": None, "reason": "trust me", "args_sha256": "0" * 64,
                     "policy_version": decision["bundle_version"]},
                    tenant,
                    run_id,
                ),
                NewEvent(
                    "PolicyDecision",
                    dict(decision, decision_id="dec_denied", decision="deny", attempt=2),
                    tenant,
                    run_id,
                ),
                NewEvent(
                    "ToolCallDispatched",
                    dict(dispatched, attempt=2, envelope_sha256="0" * 64),
                    tenant,
                    run_id,
                ),
            ],
        )  # fmt: skip
        session.commit()
    done = stack.cli("ledger", "verify", "--json", token=token)
    report = json.loads(done.stdout)
    assert done.returncode == 1, report
    problems = {(b["kind"], b["problem"]) for b in report["broken"]}
    assert problems == {
        (
            "ApprovalGranted",
            f"link: approval ap_forged was never requested for node {node} of this run",
        ),
        ("ToolCallDispatched", "envelope: its digest is not the event's envelope_sha256"),
    }, problems
