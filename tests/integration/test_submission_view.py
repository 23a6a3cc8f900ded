"""A submission answers with the run as its transaction committed it, built from the rows
in hand instead of read back: it must be exactly what reading the run gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Stack

pytestmark = pytest.mark.integration

LATER = ("status", "attempt", "result", "result_sha256", "receipt", "error")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def settled_fields(run: dict[str, Any]) -> dict[str, Any]:
    """What no later step of the run changes (its node's outcome comes later)."""
    return {
        **{k: v for k, v in run.items() if k not in ("status", "nodes")},
        "nodes": [{k: v for k, v in n.items() if k not in LATER} for n in run["nodes"]],
    }


@pytest.mark.parametrize(
    ("call", "status"),
    [
        ({"tool": "read_repo_file", "args": {"path": ".env"}}, "denied"),
        (
            {"tool": "read_repo_file", "args": {"path": "README.md"}, "environment": "prod"},
            "awaiting_approval",
        ),
    ],
)
def test_the_answer_to_a_call_is_the_run_as_read(
    stack: Stack, call: dict[str, Any], status: str
) -> None:
    admin = bearer(stack.tenant())
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        answer = http.post(
            "/v1/calls", json={**call, "on_behalf_of": "agent-7"}, headers=admin
        ).json()
        assert answer["status"] == status, answer
        read = http.get(f"/v1/runs/{answer['run_id']}", headers=admin).json()
    assert answer == read
    if status == "awaiting_approval":
        assert answer["nodes"][0]["approval"]["status"] == "pending"


def test_a_dispatched_call_and_a_workflow_answer_as_read(stack: Stack) -> None:
    admin = bearer(stack.tenant())
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        call = http.post(
            "/v1/calls",
            json={"tool": "search_docs", "args": {"query": "ledger"}},
            headers={**admin, "Idempotency-Key": "view-1"},
        ).json()
        assert call["status"] == "running" and call["nodes"][0]["status"] == "queued", call
        assert call["nodes"][0]["attempt"] == 1 and call["nodes"][0]["result"] is None
        workflow = http.post(
            "/v1/runs",
            json={
                "workflow": "repo-review",
                "inputs": {"query": "ledger", "path": "src/shipit/deploy.py"},
            },
            headers=admin,
        )
        assert workflow.status_code == 201, workflow.text
        flow = workflow.json()
        for answer in (call, flow):
            read = http.get(f"/v1/runs/{answer['run_id']}", headers=admin).json()
            assert settled_fields(answer) == settled_fields(read)
        # the same key again answers with the run as it is now, read
        again = http.post(
            "/v1/calls",
            json={"tool": "search_docs", "args": {"query": "ledger"}},
            headers={**admin, "Idempotency-Key": "view-1"},
        ).json()
        now = http.get(f"/v1/runs/{call['run_id']}", headers=admin).json()
        assert again["run_id"] == call["run_id"]
        assert settled_fields(again) == settled_fields(now)


TWO_FIRST = """
name: two-first
nodes:
  - id: held
    tool: read_repo_file
    args: {path: README.md}
  - id: refused
    tool: read_repo_file
    args: {path: .env}
"""


def test_a_workflow_whose_approval_is_cancelled_at_submission_answers_as_read(
    stack: Stack, token: str
) -> None:
    """Two first nodes: the first waits for an approval, the second is denied, so the run
    ends denied at submission and the approval is cancelled in the same transaction.
    Reading the run shows that cancelled approval on the first node: so must the answer."""
    from control.orchestration.workflows import parse_workflow

    client = stack.client(token)
    spec = parse_workflow(TWO_FIRST, source="two-first.yaml")
    answer = client.start_workflow(spec, {}, environment="prod")
    read = client.run(answer.run_id)
    assert read.status == "denied", read
    held = read.nodes[0]
    assert held.status == "cancelled" and held.approval is not None, held
    assert held.approval["status"] == "cancelled"
    assert answer.nodes[0].approval == held.approval  # the answer said None
    assert answer.as_dict() == read.as_dict()


def test_the_answer_is_the_run_as_read_when_the_database_speaks_another_time_zone(
    stack: Stack, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL gives timestamps in its session's TimeZone (the server's default, or
    PGTZ): reading the run shows created_at (and an approval's expires_at) in that zone,
    and the answer must show the same text, not the Python value's +00:00."""
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")  # a fresh engine's connections use it
    client = stack.client(token)
    answer = client.submit_call(
        "read_repo_file", {"path": "README.md"}, environment="prod", on_behalf_of="agent-7"
    )
    read = client.run(answer.run_id)
    assert read.status == "awaiting_approval", read
    assert answer.created_at == read.created_at
    assert answer.nodes[0].approval == read.nodes[0].approval


def test_a_frozen_tenants_call_and_an_entitlement_denied_call_answer_as_read(
    stack: Stack, token: str, tmp_path: Path
) -> None:
    from tests.integration.govern import bundle_with, client_on

    admin = stack.client(token)
    tenant = admin.identity.tenant_name
    plans = {"plans": {"none": {"rate": {"calls": 1, "per_s": 3600}}}, "tenants": {tenant: "none"}}
    limited = client_on(stack, token, bundle_with(stack, tmp_path, entitlements=plans))
    first = limited.submit_call("search_docs", {"query": "one"})
    assert first.status == "running", first
    denied = limited.submit_call("search_docs", {"query": "two"})
    assert denied.nodes[0].error["code"] == "entitlement_exceeded", denied
    assert denied.as_dict() == limited.run(denied.run_id).as_dict()
    admin.freeze(reason="review")
    try:
        frozen = admin.submit_call("search_docs", {"query": "three"})
        assert frozen.status == "denied" and "frozen" in frozen.nodes[0].error["message"]
        assert frozen.as_dict() == admin.run(frozen.run_id).as_dict()
    finally:
        admin.unfreeze(reason="review done")
