"""The operator pins tools: a worker's changed manifest is held, not applied, until approved.

A stack of its own (only `sleepy` runs a worker; every tool has its key). Manifests are
signed with the tool's real key and pushed onto ``results`` the way a worker (or a
thief of its key) announces one. The harness approved, as ``toolplane up`` does, the
manifest that the code on this host builds for `sleepy`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from sqlalchemy import func, select

import celeryconfig
from control.governance.auth import create_tenant
from control.ops.runtime import ControlPlane
from control.orchestration.manifests import MAX_HELD_PER_TOOL, pin_manifest
from ledger.models import EvidenceEvent, Node, ToolAnnouncement, ToolApproval
from ledger.verify import verify_ledger
from sandbox_tasks.receipts import sign_manifest
from sandbox_tasks.registry import load_tools
from tests.harness import (
    Services,
    Stack,
    own_stack,
    wait_for,
)
from toolplane.canonical import digest
from toolplane.keystore import KeyStore

pytestmark = pytest.mark.integration

CATASTROPHIC = "^(.*?,){12}P"


@pytest.fixture(scope="module")
def pinned(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Its own Redis database and ledger: no other stack's control takes its messages."""
    home = Path(tmp_path_factory.mktemp("pinning"))
    with own_stack(services, home, workers={"sleepy": 1}) as running:
        yield running


@pytest.fixture(scope="module")
def broker(pinned: Stack) -> Celery:
    app = Celery("announcer", set_as_current=False)
    app.conf.update(celeryconfig.build_config(pinned.services.redis_url))
    return app


def sessions(stack: Stack) -> Any:
    stack.tenant()  # makes the stack's owner sessions
    return stack._sessions


def operator_token(stack: Stack) -> str:
    with sessions(stack)() as session:
        _, token = create_tenant(session, f"ops-{secrets.token_hex(4)}", operator=True)
        session.commit()
    return token


def announce(stack: Stack, broker: Celery, manifest: dict[str, Any]) -> str:
    """Push ``manifest`` signed with its tool's real key, as its worker would; its digest."""
    signer = KeyStore(stack.settings().keys_dir).signer(f"tool.{manifest['name']}")
    signed = sign_manifest(manifest, signer)
    broker.send_task(
        celeryconfig.MANIFEST_TASK,
        args=[signed.model_dump(mode="json")],
        queue=celeryconfig.RESULTS_QUEUE,
    )
    return digest(manifest)


def events(stack: Stack, kind: str) -> list[dict[str, Any]]:
    with sessions(stack)() as session:
        return list(
            session.scalars(select(EvidenceEvent.payload).where(EvidenceEvent.kind == kind))
        )


def held(stack: Stack, sha: str) -> dict[str, Any]:
    return wait_for(
        lambda: next(
            (e for e in events(stack, "ToolManifestHeld") if e["manifest_sha256"] == sha), None
        ),
        timeout=30,
        what=f"ToolManifestHeld {sha[:12]}",
    )


def built_here(tool: str) -> dict[str, Any]:
    return load_tools(["tests.fixture_tools"])[tool].manifest()


def call(stack: Stack, token: str, tool: str, args: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        return client.post(
            "/v1/calls",
            json={"tool": tool, "args": args},
            headers={"Authorization": f"Bearer {token}"},
        )


def approve(stack: Stack, token: str, tool: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        return client.post(
            f"/v1/tools/{tool}/approve", json=body, headers={"Authorization": f"Bearer {token}"}
        )


def test_a_changed_manifest_is_held_until_the_operator_approves_it(
    pinned: Stack, broker: Celery
) -> None:
    token = pinned.tenant()
    original = built_here("sleepy")
    with sessions(pinned)() as session:
        pin = session.get(ToolApproval, "sleepy")
        assert pin is not None and pin.manifest_sha256 == digest(original)
        assert pin.via == "toolplane up"
    changed = json.loads(json.dumps(original))
    changed["version"] = "9.9.9"
    changed["args_schema"]["properties"]["seconds"]["maximum"] = 0.5  # was 30
    changed["limits"]["timeout_s"] = 1
    changed["max_attempts"] = 9
    sha = announce(pinned, broker, changed)
    event = held(pinned, sha)
    assert event["approved_sha256"] == digest(original) and event["version"] == "9.9.9"

    # The control keeps the approved schema, limits and retries.
    kept = call(pinned, token, "sleepy", {"seconds": 1})
    assert kept.status_code == 201, kept.text
    run_id = kept.json()["run_id"]
    with sessions(pinned)() as session:
        node = session.scalars(select(Node).where(Node.run_id == run_id)).one()
        assert node.envelope is not None, node.error  # dispatched under the approved manifest
        assert node.max_attempts == original["max_attempts"] != changed["max_attempts"]
    listed = pinned.cli("tools", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    sleepy = next(t for t in json.loads(listed.stdout) if t["tool"] == "sleepy")
    assert sleepy["status"] == "approved" and sleepy["manifest_sha256"] == digest(original)
    assert sha in [h["manifest_sha256"] for h in sleepy["held"]]

    # Who may approve: not a submitter or an approver, nor an admin of a plain tenant.
    body = {"version": "9.9.9", "sha256": sha}
    for role in ("submitter", "approver"):
        issued = pinned.http(token).issue_token(f"p-{role}", role)
        refused = approve(pinned, issued.token, "sleepy", body)
        assert refused.status_code == 403, refused.text
    assert approve(pinned, token, "sleepy", body).status_code == 403
    ops = operator_token(pinned)
    never = approve(pinned, ops, "sleepy", {"version": "7.7.7", "sha256": sha})
    assert never.status_code == 404 and "7.7.7" in never.json()["detail"]
    wrong = approve(pinned, ops, "sleepy", {"version": "9.9.9", "sha256": "0" * 64})
    assert wrong.status_code == 404, wrong.text
    missing = pinned.cli("tools", "approve", "sleepy", "7.7.7")
    assert missing.returncode == 1 and "no worker announced" in missing.stderr

    # The operator approves it on the control host: it takes effect.
    done = pinned.cli("tools", "approve", "sleepy", "9.9.9", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["manifest_sha256"] == sha
    approved = [e for e in events(pinned, "ToolApproved") if e["manifest_sha256"] == sha]
    assert len(approved) == 1 and approved[0]["via"] == "toolplane tools approve"
    assert approved[0]["by"] and approved[0]["previous_sha256"] == digest(original)

    def refused_now() -> httpx.Response | None:  # the API process reads it within seconds
        response = call(pinned, token, "sleepy", {"seconds": 1})
        return response if response.status_code == 422 else None

    refused = wait_for(refused_now, timeout=30, interval=0.5, what="the new schema in force")
    assert "seconds" in refused.json()["detail"]

    plane = ControlPlane(
        pinned.settings(),
        broker_url=pinned.env["TOOLPLANE_BROKER_URL"],
        database_url=pinned.env["TOOLPLANE_DATABASE_URL"],
    )
    try:
        with plane.sessions() as session:  # every chain: the system's holds the approvals
            report = verify_ledger(session, plane.keyring(refresh=True))
    finally:
        plane.engine.dispose()
    assert report.ok, report.broken

    # The operator's next start approves again what the code here builds.
    restored = approve_original(pinned, ops, original)
    assert restored.status_code == 200, restored.text


def approve_original(stack: Stack, ops: str, original: dict[str, Any]) -> httpx.Response:
    return approve(
        stack, ops, "sleepy", {"version": original["version"], "sha256": digest(original)}
    )


def test_a_tool_without_an_approved_manifest_cannot_be_called(
    pinned: Stack, broker: Celery
) -> None:
    token = pinned.tenant()
    manifest = built_here("probe")  # it has a key; this stack approved nothing of it
    sha = announce(pinned, broker, manifest)
    held(pinned, sha)
    refused = call(pinned, token, "probe", {"action": "noop"})
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert "'probe'" in detail and "toolplane tools approve probe 1.0.0" in detail.replace(
        manifest["version"], "1.0.0"
    )
    listed = pinned.http(token).tools()
    probe = next(t for t in listed if t.tool == "probe")
    assert probe.status == "held" and probe.manifest is None
    assert [h.manifest_sha256 for h in probe.held] == [sha]

    # Approved on the control host, but no worker of it announced that manifest yet.
    expected = built_here("lint_python")
    with sessions(pinned)() as session:
        pin_manifest(
            session,
            tool="lint_python",
            version=expected["version"],
            sha256=digest(expected),
            by="test",
            via="test",
        )
        session.commit()
    waiting = call(pinned, token, "lint_python", {"code": "x = 1"})
    assert waiting.status_code == 422, waiting.text
    assert "no worker announced its approved manifest" in waiting.json()["detail"]
    lint = next(t for t in pinned.http(token).tools() if t.tool == "lint_python")
    assert lint.status == "awaiting_announcement" and lint.approved_sha256 == digest(expected)


def test_a_schema_re2_cannot_compile_is_refused_at_approval(pinned: Stack, broker: Celery) -> None:
    manifest = built_here("probe")
    manifest["version"] = "6.6.6"
    manifest["args_schema"]["properties"]["action"]["pattern"] = "^(a)\\1$"
    sha = announce(pinned, broker, manifest)
    event = held(pinned, sha)
    assert "RE2 cannot compile" in event["problem"]
    refused = approve(pinned, operator_token(pinned), "probe", {"version": "6.6.6", "sha256": sha})
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["code"] == "manifest_refused" and "backreferences" in body["detail"]
    cli = pinned.cli("tools", "approve", "probe", "6.6.6")
    assert cli.returncode == 2 and "RE2 cannot compile" in cli.stderr


def test_a_catastrophic_pattern_cannot_stall_the_control(pinned: Stack, broker: Celery) -> None:
    """Python's re takes 0.3 s on this pattern at 22 commas, tripling every 2 more; RE2 is
    linear: 100,000 commas are refused at once, and the API answers meanwhile."""
    token, ops = pinned.tenant(), operator_token(pinned)
    original = built_here("sleepy")
    manifest = json.loads(json.dumps(original))
    manifest["version"] = "6.6.7"
    manifest["args_schema"]["properties"]["tag"]["pattern"] = CATASTROPHIC
    sha = announce(pinned, broker, manifest)
    held(pinned, sha)
    approved = approve(pinned, ops, "sleepy", {"version": "6.6.7", "sha256": sha})
    assert approved.status_code == 200, approved.text
    try:

        def pattern_applies() -> bool:
            response = call(pinned, token, "sleepy", {"seconds": 0, "tag": "x"})
            return response.status_code == 422

        wait_for(pattern_applies, timeout=30, interval=0.5, what="the pattern in force")
        started = time.monotonic()
        refused = call(pinned, token, "sleepy", {"seconds": 0, "tag": "," * 100_000})
        elapsed = time.monotonic() - started
        assert refused.status_code == 422 and "does not match" in refused.json()["detail"]
        assert elapsed < 5, f"the control took {elapsed:.2f}s to refuse"
        matching = call(pinned, token, "sleepy", {"seconds": 0, "tag": "a," * 12 + "P"})
        assert matching.status_code == 201, matching.text
    finally:
        assert approve_original(pinned, ops, original).status_code == 200


def test_a_key_that_announces_without_end_fills_no_ledger(pinned: Stack, broker: Celery) -> None:
    """Each distinct manifest is held once; past MAX_HELD_PER_TOOL of one tool, more are
    logged and dropped, and the tool's approval is untouched."""
    base = built_here("search_docs")  # has a key here, approved nothing
    digests = []
    for n in range(MAX_HELD_PER_TOOL + 5):
        digests.append(announce(pinned, broker, base | {"version": f"0.0.{n}"}))
    again = announce(pinned, broker, base | {"version": "0.0.0"})  # the same digest again

    def kept() -> int | None:
        with sessions(pinned)() as session:
            count = session.scalar(
                select(func.count())
                .select_from(ToolAnnouncement)
                .where(ToolAnnouncement.tool == "search_docs")
            )
        return count if count == MAX_HELD_PER_TOOL else None

    wait_for(kept, timeout=60, what=f"{MAX_HELD_PER_TOOL} held manifests")
    wait_for(
        lambda: pinned.log("control").count("manifest.not_kept tool=search_docs") >= 5,
        timeout=60,
        what="the manifests past the cap logged",
    )
    held_events = [e for e in events(pinned, "ToolManifestHeld") if e["tool"] == "search_docs"]
    assert len(held_events) == MAX_HELD_PER_TOOL
    assert again == digests[0]
