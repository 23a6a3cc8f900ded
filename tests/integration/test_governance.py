"""Identity, tenancy, approvals, the kill switch and hot policy reloads, on real services."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, update

from control.errors import AuthError, NotFound, UsageError
from control.governance.approvals import (
    ApprovalRefused,
    binding_problem,
    expire_approvals,
    use_approval,
)
from control.governance.auth import Role
from control.governance.freeze import active_freeze, freeze
from ledger.models import Approval, Node, Principal, Run
from tests.harness import REPO, Stack, wait_for
from tests.integration.govern import (
    bundle_with,
    client_on,
    evidence,
    outbox_rows,
    principal,
    tenant_evidence,
)

pytestmark = pytest.mark.integration

PROD_README = {"path": "README.md"}  # in prod, outside src/: waits for an approval


@pytest.fixture
def team(stack: Stack, token: str):
    """An admin, a submitter, two approvers and an auditor of one fresh tenant."""
    admin = stack.client(token)
    return {
        "admin": admin,
        "alice": principal(admin, stack, "alice", "submitter"),
        "bob": principal(admin, stack, "bob", "approver"),
        "carol": principal(admin, stack, "carol", "approver"),
        "audit": principal(admin, stack, "audit", "auditor"),
    }


def waiting_call(client, **kw):
    view = client.call("read_repo_file", PROD_README, environment="prod", **kw)
    assert view.status == "awaiting_approval", view
    return view


# -- tokens ------------------------------------------------------------------------------


def test_tokens_expire(stack: Stack, token: str) -> None:
    admin = stack.client(token)
    issued = admin.issue_token("shortlived", Role.SUBMITTER, expires_in_s=2)
    assert stack.client(issued.token).identity.principal == "shortlived"
    time.sleep(max(0.0, (issued.expires_at - datetime.now(UTC)).total_seconds()) + 0.2)
    done = stack.cli("runs", "list", token=issued.token)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: TOOLPLANE_TOKEN has expired"


def test_tokens_are_revoked_at_once_and_only_in_their_tenant(stack: Stack, token: str) -> None:
    issued = stack.cli(
        "token",
        "issue",
        "--tenant",
        stack.client(token).identity.tenant_name,
        "--principal",
        "ci-bot",
        "--role",
        "submitter",
        "--expires-in",
        "30d",
        "--json",
        token=token,
    )
    assert issued.returncode == 0, issued.stderr
    bot = json.loads(issued.stdout)
    assert bot["expires_at"] is not None
    listed = stack.cli("token", "list", "--json", token=token)
    rows = {r["token_id"]: r for r in json.loads(listed.stdout)}
    assert rows[bot["token_id"]]["state"] == "active"
    assert bot["token"] not in listed.stdout  # secrets are never kept, so never listed

    other_admin = stack.tenant()
    foreign = stack.cli("token", "revoke", bot["token_id"], token=other_admin)
    assert foreign.returncode == 1
    assert foreign.stderr.strip() == f"error: token {bot['token_id']!r} not found"

    assert stack.cli("token", "revoke", bot["token_id"], token=token).returncode == 0
    refused = stack.cli("runs", "list", token=bot["token"])
    assert refused.stderr.strip() == "error: TOOLPLANE_TOKEN was revoked"
    again = stack.cli("token", "revoke", bot["token_id"], token=token)
    assert again.returncode == 2 and "already revoked" in again.stderr
    kinds = [e["token_id"] for e in tenant_evidence(stack.client(token), "TokenRevoked")]
    assert kinds == [bot["token_id"]]


@pytest.mark.parametrize(
    ("lifetime", "rule"),
    [
        ("forever", "'forever' is not a duration like 30m, 2h or 7d"),
        ("9999999d", "a token lives at most 3650d"),
    ],
)
def test_a_bad_expiry_names_the_option(stack: Stack, token: str, lifetime: str, rule: str) -> None:
    name = stack.client(token).identity.tenant_name
    done = stack.cli(
        "token",
        "issue",
        "--tenant",
        name,
        "--principal",
        "x",
        "--role",
        "submitter",
        "--expires-in",
        lifetime,
        token=token,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --expires-in: {rule}"


def test_only_admins_manage_tokens(team) -> None:
    for who in ("alice", "bob", "audit"):
        with pytest.raises(AuthError, match="needs admin"):
            team[who].issue_token("mallory", Role.ADMIN)
        with pytest.raises(AuthError, match="needs admin"):
            team[who].tokens()


# -- tenancy -----------------------------------------------------------------------------


def test_another_tenants_runs_and_approvals_do_not_exist(stack: Stack, team) -> None:
    view = waiting_call(team["alice"])
    run_id = view.run_id
    other = stack.client(stack.tenant())
    other_approver = principal(other, stack, "eve", "approver")
    for attempt in (
        lambda: other.run(run_id),
        lambda: other.verify_ledger(run_id=run_id),
        lambda: other_approver.approve(run_id, "read_repo_file"),
        lambda: other_approver.reject(run_id, "read_repo_file", reason="mine now"),
    ):
        with pytest.raises(NotFound, match=f"{run_id}"):
            attempt()
    assert run_id not in {v.run_id for v in other.runs(limit=1000)}
    assert other_approver.runs(awaiting_approval=True) == []
    # Not found, byte for byte the same as for a run that never existed.
    real = stack.cli("approve", run_id, "read_repo_file", token=other_approver._token)
    fake = stack.cli("approve", "run_" + "0" * 24, "read_repo_file", token=other_approver._token)
    assert real.returncode == fake.returncode == 1
    assert real.stderr.replace(run_id, "X") == fake.stderr.replace("run_" + "0" * 24, "X")
    assert team["alice"].run(run_id).status == "awaiting_approval"


def test_an_auditor_reads_and_verifies_and_changes_nothing(team) -> None:
    view = waiting_call(team["alice"])
    audit = team["audit"]
    assert audit.run(view.run_id).status == "awaiting_approval"
    assert audit.verify_ledger().ok
    for attempt in (
        lambda: audit.call("search_docs", {"query": "x"}),
        lambda: audit.approve(view.run_id, "read_repo_file"),
        lambda: audit.reject(view.run_id, "read_repo_file", reason="no"),
        lambda: audit.freeze(reason="stop"),
        lambda: audit.revoke_token("tk_x"),
    ):
        with pytest.raises(AuthError, match="the auditor role cannot"):
            attempt()


def test_the_principal_and_whom_it_acts_for_reach_policy_envelope_and_evidence(team) -> None:
    alice = team["alice"]
    view = alice.call(
        "search_docs", {"query": "chain"}, on_behalf_of="agent:reviewer-7", wait=True, timeout=60
    )
    assert view.status == "completed"
    assert view.submitter == "alice" and view.on_behalf_of == "agent:reviewer-7"
    events = dict(evidence(alice, view.run_id))
    assert events["RunSubmitted"]["principal"] == "alice"
    assert events["RunSubmitted"]["on_behalf_of"] == "agent:reviewer-7"
    request = events["PolicyDecision"]["request"]
    assert (request["principal"], request["role"]) == ("alice", "submitter")
    assert request["on_behalf_of"] == "agent:reviewer-7"
    assert request["args"] == {"query": "chain"}
    envelope = events["ToolCallDispatched"]["envelope"]["envelope"]
    assert (envelope["principal"], envelope["on_behalf_of"]) == ("alice", "agent:reviewer-7")
    assert alice.verify_ledger(run_id=view.run_id).ok


def test_a_bad_on_behalf_of_names_the_option(stack: Stack, token: str) -> None:
    done = stack.cli(
        "call", "search_docs", "--arg", "query=x", "--on-behalf-of", "a\x07b", token=token
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: --on-behalf-of: must be 1-200 printable")


# -- approvals ---------------------------------------------------------------------------


def test_an_approved_call_runs_and_its_receipt_binds_the_approval(stack: Stack, team) -> None:
    alice, bob = team["alice"], team["bob"]
    waited = stack.cli(
        "call",
        "read_repo_file",
        "--arg",
        "path=README.md",
        "--env",
        "prod",
        "--wait",
        "--timeout",
        "1",
        "--json",
        token=alice._token,
    )
    assert waited.returncode == 5, waited.stderr
    assert (
        "waiting: read_repo_file needs an approval by a principal with the approver role"
        " other than alice" in waited.stderr
    )
    run_id = json.loads(waited.stdout)["run_id"]
    assert outbox_rows(alice, run_id) == 0  # nothing is queued while it waits

    listed = stack.cli("runs", "list", "--awaiting-approval", token=bob._token)
    assert run_id in listed.stdout and "alice" in listed.stdout
    listed_json = json.loads(
        stack.cli("runs", "list", "--awaiting-approval", "--json", token=bob._token).stdout
    )
    assert [r["run_id"] for r in listed_json] == [run_id]
    node = listed_json[0]["nodes"][0]
    assert node["args"] == PROD_README
    assert node["approval"]["requested_by"] == "alice"
    assert node["approval"]["policies"] == ["prod-repo-reads-outside-src-need-approval"]

    approved = stack.cli(
        "approve", run_id, "read_repo_file", "--reason", "release check", "--json", token=bob._token
    )
    assert approved.returncode == 0, approved.stderr
    approval_id = json.loads(approved.stdout)["approval"]["approval_id"]
    view = alice.wait(run_id, timeout=60)
    assert view.status == "completed"
    assert view.nodes[0].approval["decided_by"] == "bob"

    events = evidence(alice, run_id)
    kinds = [k for k, _ in events]
    assert kinds == [
        "RunSubmitted",
        "PolicyDecision",
        "ApprovalRequested",
        "ApprovalGranted",
        "ToolCallDispatched",
        "ToolCallCompleted",
        "RunCompleted",
    ]
    payloads = dict(events)
    assert payloads["PolicyDecision"]["decision"] == "approval_required"
    envelope = payloads["ToolCallDispatched"]["envelope"]["envelope"]
    assert envelope["approval_id"] == approval_id
    assert envelope["policy_version"] == payloads["ApprovalRequested"]["policy_version"]
    assert payloads["ApprovalGranted"]["by"] == "bob"
    # The receipt binds the envelope's digest, and so the approval id inside it.
    completed = payloads["ToolCallCompleted"]
    assert completed["envelope_sha256"] == payloads["ToolCallDispatched"]["envelope_sha256"]
    assert alice.verify_ledger(run_id=run_id).ok

    # Single use: the same approval cannot be given, or used, again.
    with pytest.raises(UsageError, match="not awaiting approval"):
        team["carol"].approve(run_id, "read_repo_file")


def test_self_approval_is_refused_even_after_a_role_change(stack: Stack, team) -> None:
    alice = team["alice"]
    view = waiting_call(alice)
    with pytest.raises(AuthError, match="the submitter role cannot approve"):
        alice.approve(view.run_id, "read_repo_file")
    # An admin makes alice an approver (straight in the database): still her own call.
    with alice.plane.sessions() as session:
        session.execute(
            update(Principal)
            .where(Principal.id == alice.identity.principal_id)
            .values(role="approver")
        )
        session.commit()
    alice._identity = None
    assert alice.identity.role == Role.APPROVER
    with pytest.raises(AuthError, match="the submitter of a call cannot approve or reject it"):
        alice.approve(view.run_id, "read_repo_file")
    assert alice.run(view.run_id).status == "awaiting_approval"


def test_a_rejected_call_is_denied(stack: Stack, team) -> None:
    view = waiting_call(team["alice"])
    missing = stack.cli("reject", view.run_id, "read_repo_file", token=team["bob"]._token)
    assert missing.returncode == 2 and "--reason" in missing.stderr
    done = stack.cli(
        "reject",
        view.run_id,
        "read_repo_file",
        "--reason",
        "not during freeze",
        token=team["bob"]._token,
    )
    assert done.returncode == 3, done.stderr
    node = team["alice"].run(view.run_id).nodes[0]
    assert node.status == "denied"
    assert node.error == {"code": "approval_rejected", "message": "not during freeze"}
    assert [k for k, _ in evidence(team["alice"], view.run_id)][-2:] == [
        "ApprovalRejected",
        "RunFailed",
    ]
    with pytest.raises(UsageError, match="not awaiting approval"):
        team["carol"].approve(view.run_id, "read_repo_file")


def test_an_approval_replayed_on_another_call_is_refused(team) -> None:
    alice, bob = team["alice"], team["bob"]
    first = waiting_call(alice)
    second = waiting_call(alice)  # the very same call again: it needs its own approval
    bob.approve(first.run_id, "read_repo_file")
    with alice.plane.sessions() as session:
        approval = session.scalar(select(Approval).where(Approval.run_id == first.run_id))
        run = session.get(Run, second.run_id)
        node = session.get(Node, (second.run_id, "read_repo_file"))
        version = alice.plane.policy.version
        assert binding_problem(approval, run, node, version) == (
            "the approval was given for another call"
        )
        with pytest.raises(ApprovalRefused, match="already used"):
            use_approval(session, approval.id, run=run, node=node, policy_version=version)
        # Even unspent, it is bound to its own call.
        approval.used_at = None
        with pytest.raises(ApprovalRefused, match="given for another call"):
            use_approval(session, approval.id, run=run, node=node, policy_version=version)
        session.rollback()
    assert alice.run(second.run_id).status == "awaiting_approval"


def test_an_approval_is_refused_after_the_arguments_changed(team) -> None:
    alice, bob = team["alice"], team["bob"]
    view = waiting_call(alice)
    with alice.plane.sessions() as session:  # someone with database access swaps the path
        session.execute(
            update(Node).where(Node.run_id == view.run_id).values(args={"path": "ruff.toml"})
        )
        session.commit()
    decided = bob.approve(view.run_id, "read_repo_file")
    assert decided.status == "refused"
    assert "arguments changed" in decided.message
    node = alice.run(view.run_id).nodes[0]
    assert node.status == "denied" and node.error["code"] == "approval_rejected"
    assert outbox_rows(alice, view.run_id) == 0
    rejected = dict(evidence(alice, view.run_id))["ApprovalRejected"]
    assert rejected["refused"] is True


def test_an_approval_is_refused_after_the_policy_changed(stack: Stack, team, tmp_path: Path):
    bundle = bundle_with(stack, tmp_path)
    alice = client_on(stack, team["alice"]._token, bundle)
    bob = client_on(stack, team["bob"]._token, bundle)
    view = waiting_call(alice)
    before = alice.plane.policy.version
    with (bundle / "policies.cedar").open("a") as f:
        f.write("\n// a reviewed change\n")
    time.sleep(1.1)  # bundles are looked at once a second
    assert bob.plane.policy.version != before
    decided = bob.approve(view.run_id, "read_repo_file")
    assert decided.status == "refused"
    assert "the policy changed since the approval was requested" in decided.message
    assert alice.run(view.run_id).nodes[0].status == "denied"


def test_an_approval_expires_and_the_call_is_denied(stack: Stack, team, tmp_path: Path):
    gate = '@id("gate")\n@approval("1s")\nforbid (principal, action, resource == Toolplane::Tool::"search_docs");\n'
    bundle = bundle_with(stack, tmp_path, cedar=gate)
    alice = client_on(stack, team["alice"]._token, bundle)
    bob = client_on(stack, team["bob"]._token, bundle)
    late = alice.call("search_docs", {"query": "a"})
    lapsed = alice.call("search_docs", {"query": "b"})
    assert late.status == lapsed.status == "awaiting_approval"
    time.sleep(1.2)
    # Approving late is refused whether this command or the control's sweep sees it first.
    try:
        assert bob.approve(late.run_id, "search_docs").status == "expired"
    except UsageError as e:
        assert "is not awaiting approval (it is denied)" in str(e)
    error = alice.run(late.run_id).nodes[0].error
    assert error["code"] == "approval_rejected" and "expired" in error["message"]
    assert outbox_rows(alice, late.run_id) == 0
    # Nobody answered the other: the control process's sweep denies it.
    wait_for(lambda: alice.run(lapsed.run_id).status == "denied", what="the expiry sweep")
    with alice.plane.sessions() as session:
        assert expire_approvals(session) == 0  # nothing is left to expire, nor expired twice
    assert "expired unanswered" in alice.run(lapsed.run_id).nodes[0].error["message"]
    assert [k for k, _ in evidence(alice, lapsed.run_id)][-2:] == ["ApprovalExpired", "RunFailed"]


# -- the kill switch -----------------------------------------------------------------------


def test_a_frozen_tenant_dispatches_nothing(stack: Stack, team) -> None:
    admin, alice, bob = team["admin"], team["alice"], team["bob"]
    waiting = waiting_call(alice)
    for who in ("alice", "bob", "audit"):
        with pytest.raises(AuthError):
            team[who].freeze(reason="no")
    frozen = stack.cli("policy", "freeze", "--reason", "incident 42", token=admin._token)
    assert frozen.returncode == 0, frozen.stderr
    denied = stack.cli("call", "search_docs", "--arg", "query=x", "--json", token=alice._token)
    assert denied.returncode == 3
    run = json.loads(denied.stdout)
    assert run["nodes"][0]["error"]["code"] == "policy_denied"
    assert "frozen for this tenant by" in run["nodes"][0]["error"]["message"]
    assert "incident 42" in run["nodes"][0]["error"]["message"]
    assert outbox_rows(alice, run["run_id"]) == 0
    # An approval given during the freeze dispatches nothing either.
    decided = bob.approve(waiting.run_id, "read_repo_file")
    assert "frozen" in decided.message and decided.outbox_ids == ()
    assert alice.run(waiting.run_id).status == "denied"
    # Other tenants are not affected.
    other = stack.client(stack.tenant())
    assert other.call("search_docs", {"query": "x"}, wait=True, timeout=60).status == "completed"

    assert (
        stack.cli("policy", "unfreeze", "--reason", "resolved", token=admin._token).returncode == 0
    )
    assert alice.call("search_docs", {"query": "x"}, wait=True, timeout=60).status == "completed"
    scopes = [(e["scope"], e["reason"]) for e in tenant_evidence(admin, "PolicyFrozen")]
    assert scopes == [(admin.identity.tenant_id, "incident 42")]
    assert [e["reason"] for e in tenant_evidence(admin, "PolicyUnfrozen")] == ["resolved"]


def test_freezing_everything_needs_an_operator(stack: Stack, token: str) -> None:
    plain = stack.client(token)
    with pytest.raises(AuthError, match="operator"):
        plain.freeze(everything=True, reason="all")
    made = stack.cli("tenant", "create", f"ops-{time.time_ns() % 10**8}", "--operator", "--json")
    ops = stack.client(json.loads(made.stdout)["token"])
    ops.freeze(everything=True, reason="global incident")
    try:
        denied = plain.call("search_docs", {"query": "x"})
        assert denied.status == "denied"
        assert "frozen for every tenant" in denied.nodes[0].error["message"]
    finally:
        ops.unfreeze(everything=True, reason="over")
    assert plain.call("search_docs", {"query": "x"}, wait=True, timeout=60).status == "completed"


def test_a_freeze_waits_for_dispatches_in_flight_and_then_stops_them(team) -> None:
    admin, alice = team["admin"], team["alice"]
    tenant_id = admin.identity.tenant_id
    session = alice.plane.sessions()
    assert active_freeze(session, tenant_id) is None  # a dispatch in flight holds the lock
    done = threading.Event()

    def stop() -> None:
        with admin.plane.sessions() as s:
            freeze(s, admin.identity, everything=False, reason="now")
            s.commit()
        done.set()

    thread = threading.Thread(target=stop)
    thread.start()
    assert not done.wait(0.5), "the freeze committed while a dispatch was in flight"
    session.commit()  # the in-flight dispatch ends
    assert done.wait(10)
    thread.join()
    session.close()
    assert alice.call("search_docs", {"query": "x"}).status == "denied"
    admin.unfreeze(reason="test over")


# -- policies take effect without restarts ---------------------------------------------------


def test_a_new_bundle_takes_effect_and_a_broken_one_is_refused(stack: Stack, team, tmp_path):
    bundle = bundle_with(stack, tmp_path)
    alice = client_on(stack, team["alice"]._token, bundle)
    first = alice.call("search_docs", {"query": "x"})
    assert first.status != "denied"
    old = alice.plane.policy.version
    (bundle / "extra.cedar").write_text(
        '@id("no-search-today")\nforbid (principal, action, resource == Toolplane::Tool::"search_docs");\n'
    )
    time.sleep(1.1)
    second = alice.call("search_docs", {"query": "x"})
    assert second.status == "denied"
    assert "no-search-today" in second.nodes[0].error["message"]
    new = alice.plane.policy.version
    assert new != old
    loaded = [e["version"] for e in tenant_evidence(alice, "PolicyVersionLoaded", system=True)]
    assert new in loaded

    (bundle / "extra.cedar").write_text('@id("broken")\npermit (principal action resource);\n')
    time.sleep(1.1)
    third = alice.call("search_docs", {"query": "x"})
    assert third.status == "denied"  # the running bundle stays in force
    assert alice.plane.policy.version == new
    refused = tenant_evidence(alice, "PolicyBundleRefused", system=True)
    assert refused and refused[-1]["running_version"] == new
    assert "syntax error" in refused[-1]["problem"]


def test_log_only_decisions_are_evidence(team) -> None:
    alice = team["alice"]
    view = alice.call("search_docs", {"query": "x"}, environment="prod", wait=True, timeout=60)
    assert view.status == "completed"
    decision = dict(evidence(alice, view.run_id))["PolicyDecision"]
    assert decision["decision"] == "allow"
    assert decision["log_only"]["decision"] == "deny"
    assert decision["log_only"]["policies"] == ["prod-calls-name-an-end-user"]
    assert decision["log_only"]["differs"] is True


def test_arguments_are_decided_by_policy_end_to_end(stack: Stack, team) -> None:
    done = stack.cli(
        "call", "read_repo_file", "--arg", "path=.env", "--json", token=team["alice"]._token
    )
    assert done.returncode == 3
    run = json.loads(done.stdout)
    assert "no-secret-files" in run["nodes"][0]["error"]["message"]
    assert outbox_rows(team["alice"], run["run_id"]) == 0


def test_policy_explain_and_test_commands(stack: Stack, tmp_path: Path) -> None:
    explained = stack.cli(
        "policy",
        "explain",
        "--tool",
        "read_repo_file",
        "--env",
        "prod",
        "--arg",
        "path=README.md",
        token=stack.tenant(),
    )
    assert explained.returncode == 5, explained.stderr
    assert explained.stdout.startswith(
        "APPROVAL_REQUIRED: needs an approval under prod-repo-reads-outside-src-need-approval"
    )
    assert "log-only: would deny under prod-calls-name-an-end-user" in explained.stdout
    passed = stack.cli("policy", "test", str(REPO / "policy" / "bundles" / "default"))
    assert passed.returncode == 0, passed.stdout
    assert "0 failed: passed" in passed.stdout
    none = stack.cli("policy", "test")  # the stack's bundle carries no tests
    assert none.returncode == 1 and "no policy tests" in none.stderr
    bundle = bundle_with(stack, tmp_path)
    (bundle / "tests" / "wrong.json").write_text(
        json.dumps(
            {
                "cases": [
                    {
                        "name": "restricted search is allowed",
                        "expect": "allow",
                        "request": {"tool": "search_docs", "classification": "restricted"},
                    }
                ]
            }
        )
    )
    failed = stack.cli("policy", "test", str(bundle))
    assert failed.returncode == 1
    assert "FAIL tests/wrong.json: restricted search is allowed" in failed.stdout
    assert "expected allow, got deny" in failed.stdout


# -- review findings -------------------------------------------------------------------------


def test_a_submitter_cannot_approve_through_a_token_it_minted(stack: Stack, team) -> None:
    admin, bob = team["admin"], team["bob"]
    view = waiting_call(admin)  # an admin may submit
    minted = stack.client(
        admin.issue_token("bob", Role.APPROVER).token
    )  # bob's name, admin's token
    with pytest.raises(AuthError, match="issued by the call's submitter"):
        minted.approve(view.run_id, "read_repo_file")
    with pytest.raises(AuthError, match="issued by the call's submitter"):
        bob.approve(view.run_id, "read_repo_file")  # bob's own token came from the admin too
    second = stack.client(admin.issue_token("second-admin", Role.ADMIN).token)
    dana = stack.client(second.issue_token("dana", Role.APPROVER).token)
    decided = dana.approve(view.run_id, "read_repo_file", reason="four eyes")
    assert decided.status == "granted"
    granted = dict(evidence(admin, view.run_id))["ApprovalGranted"]
    assert granted["by"] == "dana" and granted["token_id"] == dana.identity.token_id
    issued = {e["principal"]: e["issued_by"] for e in tenant_evidence(admin, "TokenIssued")}
    assert issued["dana"] == "second-admin"  # who vouched for the approver is evidence


def test_reasons_are_checked(stack: Stack, team) -> None:
    view = waiting_call(team["alice"])
    bad = stack.cli(
        "reject", view.run_id, "read_repo_file", "--reason", "ok\x1b[2J", token=team["bob"]._token
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --reason: must be 1-1000 printable characters")
    assert team["alice"].run(view.run_id).status == "awaiting_approval"
