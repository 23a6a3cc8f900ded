"""An attacker against artifacts on the real stack: results at and just over the
threshold, two tenants whose results are the same bytes (one file in the store), an
event's artifact metadata rewritten in the database by a superuser (pointed at another
valid artifact, or given an absurd size), a node's metadata rewritten by the control's
own role, and an offline bundle whose ``artifacts`` are malformed. Each is named (409
problem details, `ledger verify`'s event, verify-bundle's part), never a 500 or a
traceback, and never served as the victim's result."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import select

from ledger.bundle_check import check_bundle
from ledger.chain import chain_for, event_hash
from ledger.models import EvidenceEvent
from ledger.note import NoteVerifier
from tests.harness import Stack, _libpq
from toolplane.canonical import canonical_json

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

THRESHOLD = 65_536  # the stack's TOOLPLANE_ARTIFACT_THRESHOLD (the default)


def superuser(stack: Stack) -> psycopg.Connection:
    return psycopg.connect(_libpq(stack.services.database_url), autocommit=True)


def repo_file(stack: Stack, text: str) -> str:
    name = f"art-{secrets.token_hex(4)}.txt"
    path = Path(stack.env["TOOLPLANE_REPO_ROOT"]) / name
    path.write_text(text)
    os.chmod(path, 0o644)
    return name


def read_call(stack: Stack, token: str, name: str) -> Any:
    run = stack.http(token).call("read_repo_file", {"path": name}, wait=True)
    assert run.status == "completed", run
    return run


def result_size(name: str, length: int) -> int:
    """The length of read_repo_file's canonical result for a one-line file of ``length`` x."""
    return len(
        canonical_json(
            {
                "path": name,
                "content": "x" * length,
                "sha256": "0" * 64,
                "size": length,
                "lines": 1,
                "start_line": 1,
                "end_line": 1,
            }
        )
    )


def get_run(stack: Stack, token: str, run_id: str) -> httpx.Response:
    return httpx.get(f"{stack.url}/v1/runs/{run_id}", headers={"Authorization": f"Bearer {token}"})


def completed_event(stack: Stack, token: str, run_id: str) -> tuple[int, dict[str, Any]]:
    with stack.client(token).plane.sessions() as session:
        found = session.execute(
            select(EvidenceEvent.id, EvidenceEvent.payload).where(
                EvidenceEvent.run_id == run_id, EvidenceEvent.kind == "ToolCallCompleted"
            )
        ).one()
    return found[0], dict(found[1])


def test_a_result_of_exactly_the_threshold_stays_inline_one_byte_more_goes_out(
    stack: Stack, token: str
) -> None:
    name = f"art-{secrets.token_hex(4)}.txt"
    length = THRESHOLD - (result_size(name, 60_000) - 60_000)
    assert result_size(name, length) == THRESHOLD
    path = Path(stack.env["TOOLPLANE_REPO_ROOT"]) / name
    for extra, out in ((0, False), (1, True)):
        path.write_text("x" * (length + extra))
        os.chmod(path, 0o644)
        node = read_call(stack, token, name).nodes[0]
        assert len(canonical_json(node.result)) == THRESHOLD + extra
        assert (node.artifact is not None) is out
        if out:
            assert node.artifact["size"] == THRESHOLD + 1
    assert stack.client(token).verify_ledger().ok


def test_two_tenants_with_the_same_bytes_share_a_file_not_a_run(stack: Stack, token: str) -> None:
    """Dedupe: B's identical result is one file with A's, but B's metadata names B's run,
    B cannot see A's run, and each tenant's verify is its own (both hold)."""
    name = repo_file(stack, "shared line of a large file\n" * 4000)
    a_node = read_call(stack, token, name).nodes[0]
    other = stack.tenant()
    b_run = read_call(stack, other, name)
    b_node = b_run.nodes[0]
    assert a_node.artifact["sha256"] == b_node.artifact["sha256"]
    assert b_node.artifact["run_id"] == b_run.run_id != a_node.artifact["run_id"]
    assert get_run(stack, other, a_node.artifact["run_id"]).status_code == 404
    assert stack.client(token).verify_ledger().ok and stack.client(other).verify_ledger().ok
    assert get_run(stack, token, a_node.artifact["run_id"]).json()["nodes"][0]["result"] == (
        b_node.result
    )


def test_event_metadata_pointed_at_another_valid_artifact_is_named(
    stack: Stack, token: str
) -> None:
    """A superuser rewrites A's event to name another tenant's valid artifact (hash, size,
    and the message's result_sha256 so they agree), then re-hashes the whole chain: the
    receipt, which signs the original result_sha256, still names the event."""
    victim = read_call(stack, token, repo_file(stack, "victim's large result\n" * 5000))
    other = stack.tenant()
    donor = read_call(stack, other, repo_file(stack, "another tenant's result\n" * 5000))
    planted = donor.nodes[0].artifact
    client = stack.client(token)
    chain = chain_for(client.identity.tenant_id)
    with client.plane.sessions() as session:
        rows = list(
            session.scalars(
                select(EvidenceEvent)
                .where(EvidenceEvent.chain_id == chain)
                .order_by(EvidenceEvent.seq)
            )
        )
    target = next(r for r in rows if r.run_id == victim.run_id and r.kind == "ToolCallCompleted")
    payload = copy.deepcopy(dict(target.payload))
    payload["artifact"] = {**payload["artifact"], **{k: planted[k] for k in ("sha256", "size")}}
    payload["result_sha256"] = planted["sha256"]
    payload["message"]["result"]["result_sha256"] = planted["sha256"]
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
                "UPDATE evidence_events SET payload = %s::jsonb, prev_hash = %s, hash = %s "
                "WHERE id = %s",
                (json.dumps(body), prev_hash, new_hash, row.id),
            )
            prev = new_hash
        conn.execute("UPDATE chain_heads SET hash = %s WHERE chain_id = %s", (prev, chain))
    report = client.verify_ledger()
    assert not report.ok
    assert [b.event_id for b in report.broken] == [target.id], report
    assert "receipt" in report.broken[0].problem


@pytest.mark.parametrize("size", [2**40, 2**63])
def test_an_absurd_size_in_an_event_is_named_by_verify_not_a_crash(
    stack: Stack, token: str, size: int
) -> None:
    """2**40: a read that allocated the recorded size failed with MemoryError; 2**63 is
    also beyond what canonical JSON carries (2**53), so the event's hash cannot even be
    recomputed: the event is named all the same."""
    run = read_call(stack, token, repo_file(stack, "a large result\n" * 6000))
    event_id, payload = completed_event(stack, token, run.run_id)
    payload["artifact"]["size"] = size
    with superuser(stack) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "UPDATE evidence_events SET payload = %s::jsonb WHERE id = %s",
            (json.dumps(payload), event_id),
        )
    done = stack.cli("ledger", "verify", "--json", token=token)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    broken = json.loads(done.stdout)["broken"]
    assert {b["event_id"] for b in broken} == {event_id}, broken
    problems = [b["problem"] for b in broken]
    assert any("tampered" in p for p in problems), problems
    if size < 2**53:
        assert any("do not match the hash" in p for p in problems), problems


@pytest.mark.parametrize("size", [2**63, 2**40])
def test_an_absurd_size_in_a_node_is_a_409_not_a_500(stack: Stack, token: str, size: int) -> None:
    """The node's ``artifact`` column is run state, which the control's own role may
    update: a size rewritten there is named on read."""
    run = read_call(stack, token, repo_file(stack, "a large result\n" * 6000))
    with superuser(stack) as conn:
        conn.execute(
            "UPDATE nodes SET artifact = jsonb_set(artifact, '{size}', %s::jsonb) "
            "WHERE run_id = %s",
            (str(size), run.run_id),
        )
    response = get_run(stack, token, run.run_id)
    assert response.status_code == 409, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "artifact_invalid"


# -- offline bundles whose artifacts are crafted --


@pytest.fixture(scope="module")
def exported(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    token = stack.tenant()
    run = read_call(stack, token, repo_file(stack, "a large result for a bundle\n" * 4000))
    done = stack.cli("ledger", "checkpoint", "--json")
    assert done.returncode in (0, 1), done.stderr
    folder = tmp_path_factory.mktemp("artifact-bundles")
    out = folder / "run.bundle.json"
    done = stack.cli("ledger", "export", run.run_id, "--out", str(out), token=token)
    assert done.returncode == 0, done.stdout + done.stderr
    trust = folder / "trust.json"
    assert stack.cli("ledger", "trust", "--out", str(trust)).returncode == 0
    keys = [NoteVerifier.parse(k) for k in json.loads(trust.read_text())["checkpoint_keys"]]
    bundle = json.loads(out.read_bytes())
    assert check_bundle(canonical_json(bundle), keys).ok
    return {"bundle": bundle, "keys": keys, "trust": trust, "folder": folder}


def _entry(bundle: dict[str, Any]) -> dict[str, Any]:
    return bundle["artifacts"][0]


def _other_bytes() -> dict[str, Any]:
    data = canonical_json({"content": "not in any event"})
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "media_type": "application/json",
        "data": base64.b64encode(data).decode(),
    }


CRAFTED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "not a list": (lambda b: b.update(artifacts={"a": 1}), "artifacts: not a list"),
    "an entry not an object": (lambda b: b["artifacts"].append(7), "artifacts[1]: expected"),
    "an extra field": (lambda b: _entry(b).update(x=1), "artifacts[0]: expected"),
    "no data": (lambda b: _entry(b).pop("data"), "artifacts[0]: expected"),
    "bad base64": (lambda b: _entry(b).update(data="!!not base64!!"), "artifacts[0].data"),
    "data not a string": (lambda b: _entry(b).update(data=12), "artifacts[0].data"),
    "size a string": (lambda b: _entry(b).update(size="12"), "artifacts[0] (sha256:"),
    "sha256 a number": (lambda b: _entry(b).update(sha256=12), "artifacts[0] (sha256:12)"),
    "hash of other bytes": (
        lambda b: _entry(b).update(sha256="0" * 64),
        "artifacts[0] (sha256:0000",
    ),
    "none carried": (lambda b: b.update(artifacts=[]), ".artifact: artifact sha256:"),
    "removed": (lambda b: b.pop("artifacts"), ".artifact: artifact sha256:"),
    "an entry no event names": (
        lambda b: b["artifacts"].append(_other_bytes()),
        "artifacts[1] (sha256:",
    ),
    "an entry twice": (
        lambda b: b["artifacts"].append(dict(_entry(b))),
        "artifacts[1] (sha256:",
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_bundle_artifact_is_named_never_a_crash(
    exported: dict[str, Any], case: str
) -> None:
    bundle = copy.deepcopy(exported["bundle"])
    change, named = CRAFTED[case]
    change(bundle)
    report = check_bundle(canonical_json(bundle), exported["keys"])
    assert not report.ok, case
    assert any(named in p for p in report.problems), report.problems


def test_verify_bundle_names_a_crafted_artifact_without_a_traceback(
    stack: Stack, exported: dict[str, Any]
) -> None:
    bundle = copy.deepcopy(exported["bundle"])
    _entry(bundle)["data"] = "%%%"
    path = exported["folder"] / "crafted.bundle.json"
    path.write_bytes(canonical_json(bundle))
    done = stack.cli("ledger", "verify-bundle", str(path), "--trust", str(exported["trust"]))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "artifacts[0].data" in done.stdout + done.stderr


@pytest.mark.parametrize("depth", [1, 58, 60, 61, 62, 63, 70])
def test_a_hostile_tool_s_large_deep_result_is_kept_or_refused_whole(
    stack: Stack, token: str, depth: int
) -> None:
    """A tool returns a result over the threshold nested ``depth`` levels: either it is
    kept (as an artifact that reads back and verifies) or the call fails cleanly; never a
    result accepted that its own verify or read then cannot take."""
    view = stack.client(token).call(
        "probe", {"action": "nested", "target": str(depth)}, wait=True, timeout=60
    )
    node = view.nodes[0]
    assert node.status in ("completed", "failed"), view
    if depth <= 58:  # well within canonical JSON's 64 levels: kept
        assert node.status == "completed", view
    response = get_run(stack, token, view.run_id)
    assert response.status_code == 200, response.text
    shown = response.json()["nodes"][0]
    if node.status == "completed":
        assert shown["artifact"] is not None and shown["artifact"]["size"] > THRESHOLD
        inner = shown["result"]["detail"]
        for _ in range(depth):
            inner = inner["d"]
        assert inner == {"fill": "y" * 70_000}
    assert stack.client(token).verify_ledger(run_id=view.run_id).ok
