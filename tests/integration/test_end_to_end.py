"""Each built-in tool through real worker processes, from client to ledger."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from control.orchestration.operations import Operations as Client
from ledger.models import EvidenceEvent, OutboxMessage
from tests.harness import REPO, Stack

pytestmark = pytest.mark.integration


def kinds(client: Client, run_id: str) -> list[str]:
    with client.plane.sessions() as session:
        return list(
            session.scalars(
                select(EvidenceEvent.kind)
                .where(EvidenceEvent.run_id == run_id)
                .order_by(EvidenceEvent.seq)
            )
        )


@pytest.mark.parametrize(
    ("tool", "args", "check"),
    [
        (
            "read_repo_file",
            {"path": "src/shipit/deploy.py"},
            lambda r: r["content"] == (REPO / "examples/repo/src/shipit/deploy.py").read_text(),
        ),
        (
            "search_docs",
            {"query": "hash chain"},
            lambda r: r["hits"] and "chain" in r["hits"][0]["title"].lower(),
        ),
        (
            "lint_python",
            {"code": "import subprocess\nsubprocess.call('ls', shell=True)\n"},
            lambda r: "S602" in {f["code"] for f in r["findings"]},
        ),
    ],
)
def test_each_tool_end_to_end(stack: Stack, token: str, tool: str, args: dict, check) -> None:
    client = stack.client(token)
    view = client.call(tool, args, wait=True, timeout=60)
    assert view.status == "completed", view
    node = view.nodes[0]
    assert node.status == "completed"
    assert check(node.result)
    assert node.receipt["key_id"].startswith(f"tool.{tool}:")
    assert kinds(client, view.run_id) == [
        "RunSubmitted",
        "PolicyDecision",
        "ToolCallDispatched",
        "ToolCallCompleted",
        "RunCompleted",
    ]
    report = client.verify_ledger(run_id=view.run_id)
    assert report.ok, report.broken
    assert report.receipts >= 1


def test_cli_by_hand(stack: Stack, token: str) -> None:
    called = stack.cli(
        "call", "read_repo_file", "--arg", "path=README.md", "--wait", "--json", token=token
    )
    assert called.returncode == 0, called.stderr
    run = json.loads(called.stdout)
    assert set(run) >= {"run_id", "tenant", "workflow", "status", "nodes"}
    assert run["status"] == "completed"
    node = run["nodes"][0]
    assert set(node) >= {"node_id", "tool", "status", "result", "result_sha256", "receipt", "error"}
    shown = stack.cli("runs", "show", run["run_id"], "--json", token=token)
    assert (
        shown.returncode == 0
        and json.loads(shown.stdout)["nodes"][0]["result_sha256"] == node["result_sha256"]
    )
    listed = stack.cli("runs", "list", "--json", token=token)
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [run["run_id"]]
    verified = stack.cli("ledger", "verify", "--json", token=token)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"] is True


def test_denied_call_enqueues_nothing(stack: Stack, token: str) -> None:
    client = stack.client(token)
    broker = stack.services.redis()
    before = broker.llen("tool.lint_python")
    done = stack.cli(
        "call",
        "lint_python",
        "--arg",
        "code=x = 1",
        "--classification",
        "restricted",
        "--wait",
        "--json",
        token=token,
    )
    assert done.returncode == 3, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "denied"
    assert run["nodes"][0]["error"]["code"] == "policy_denied"
    assert "no-restricted-data" in run["nodes"][0]["error"]["message"]
    assert kinds(client, run["run_id"]) == [
        "RunSubmitted",
        "PolicyDecision",
        "ToolDenied",
        "RunFailed",
    ]
    with client.plane.sessions() as session:
        assert (
            session.scalar(select(OutboxMessage).where(OutboxMessage.run_id == run["run_id"]))
            is None
        )
        decision = session.scalar(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == run["run_id"], EvidenceEvent.kind == "PolicyDecision"
            )
        )
    assert decision["decision"] == "deny" and decision["policies"] == ["no-restricted-data"]
    assert len(decision["bundle_version"]) == 64
    assert broker.llen("tool.lint_python") == before


def test_new_tool_denied_until_a_policy_permits_it(stack: Stack, token: str) -> None:
    # sleepy is permitted by the test policy in dev only; staging has no permit.
    denied = stack.cli(
        "call", "sleepy", "--arg", "seconds=0", "--env", "staging", "--wait", token=token
    )
    assert denied.returncode == 3
    assert "no policy permits sleepy" in denied.stderr
    allowed = stack.cli("call", "sleepy", "--arg", "seconds=0", "--wait", token=token)
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["call", "nope", "--arg", "x=1"], "error: TOOL: unknown tool 'nope'"),
        (
            ["call", "read_repo_file", "--arg", "path=5"],
            "error: --arg path: 5 is not of type 'string'",
        ),
        (
            ["call", "read_repo_file", "--arg", "path=a", "--arg", "evil=1"],
            "error: --arg evil: unexpected field",
        ),
        (
            ["call", "read_repo_file", "--arg", "nopath"],
            "error: --arg: 'nopath' is not of the form K=V",
        ),
        (["call", "read_repo_file"], "error: --arg path: 'path' is a required property"),
        (
            ["call", "search_docs", "--arg", "query=x", "--arg", "top_k=1000"],
            "error: --arg top_k: 1000 is greater",
        ),
        (["call", "read_repo_file", "--arg", "path=a", "--env", "a b"], "error: --env: must be"),
    ],
)
def test_bad_cli_input_is_one_line(stack: Stack, token: str, args: list[str], message: str) -> None:
    done = stack.cli(*args, token=token)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_tool_refusal_is_a_signed_failure(stack: Stack, token: str) -> None:
    done = stack.cli(
        "call", "read_repo_file", "--arg", "path=../../etc/passwd", "--wait", "--json", token=token
    )
    assert done.returncode == 4
    node = json.loads(done.stdout)["nodes"][0]
    assert node["status"] == "failed"
    assert node["error"]["code"] == "path_outside_root"
    assert node["receipt"]["key_id"].startswith("tool.read_repo_file:")
    assert stack.client(token).verify_ledger().ok


def test_idempotency_key_returns_the_same_run(stack: Stack, token: str) -> None:
    client = stack.client(token)
    first = client.call("search_docs", {"query": "cedar"}, idempotency_key="k-1", wait=True)
    second = client.call("search_docs", {"query": "cedar"}, idempotency_key="k-1", wait=True)
    assert first.run_id == second.run_id
    assert len(client.runs()) == 1


def test_tenants_see_only_their_own_runs(stack: Stack) -> None:
    alice, bob = stack.client(stack.tenant()), stack.client(stack.tenant())
    run = alice.call("search_docs", {"query": "celery"}, wait=True)
    shown = stack.cli("runs", "show", run.run_id, token=bob._token)
    assert shown.returncode == 1
    assert shown.stderr.strip() == f"error: run '{run.run_id}' not found"
    assert bob.runs() == []
    assert stack.cli("ledger", "verify", "--run", run.run_id, token=bob._token).returncode == 1
    bob_report = bob.verify_ledger()
    assert bob_report.ok and bob_report.receipts == 0


def test_commands_need_a_valid_token(stack: Stack) -> None:
    for token in (None, "tp_forged"):
        done = stack.cli("runs", "list", token=token)
        assert done.returncode == 1
        assert done.stderr.startswith("error: ") and "TOOLPLANE_TOKEN" in done.stderr


def test_roles_an_auditor_reads_and_verifies_and_changes_nothing(stack: Stack, token: str) -> None:
    tenant = json.loads(stack.cli("runs", "list", "--json", token=token).stdout or "[]")
    assert tenant == []
    name = stack.client(token).identity.tenant_name
    issued = {}
    for principal, role in (("dana", "submitter"), ("audrey", "auditor")):
        done = stack.cli(
            "token",
            "issue",
            "--tenant",
            name,
            "--principal",
            principal,
            "--role",
            role,
            "--json",
            token=token,
        )
        assert done.returncode == 0, done.stderr
        issued[role] = json.loads(done.stdout)["token"]
    ran = stack.cli(
        "call", "search_docs", "--arg", "query=cedar", "--wait", token=issued["submitter"]
    )
    assert ran.returncode == 0, ran.stderr
    refused = stack.cli("call", "search_docs", "--arg", "query=cedar", token=issued["auditor"])
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        == "error: the auditor role cannot submit calls (needs admin or submitter)"
    )
    assert stack.cli("runs", "list", token=issued["auditor"]).returncode == 0
    assert stack.cli("ledger", "verify", token=issued["auditor"]).returncode == 0
    # only an admin issues tokens
    again = stack.cli(
        "token",
        "issue",
        "--tenant",
        name,
        "--principal",
        "eve",
        "--role",
        "admin",
        token=issued["submitter"],
    )
    assert again.returncode == 1 and "cannot issue tokens (needs admin)" in again.stderr
