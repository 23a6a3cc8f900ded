"""An attacker with a token of some tenant (or none) against the live HTTP API: each test
is an attempt that must be refused (or must not break the server), from a review.

Tests marked ``xfail(strict=True)`` show findings that are not fixed yet (the lead
decides); once fixed they pass, and the strict marker makes that a failure until it
is removed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Stack, wait_for

pytestmark = pytest.mark.integration

TERMINAL = ("completed", "failed", "denied", "cancelled")
PROD_READ = {"tool": "read_repo_file", "args": {"path": "README.md"}, "environment": "prod"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def send(stack: Stack, method: str, path: str, token: str | None, **kw: Any) -> httpx.Response:
    """One request on its own connection (a 500 closes the connection it came on)."""
    headers = {**(bearer(token) if token else {}), **kw.pop("headers", {})}
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        return client.request(method, path, headers=headers, **kw)


def issue(stack: Stack, admin: str, principal: str, role: str, **extra: Any) -> dict[str, Any]:
    done = send(
        stack, "POST", "/v1/tokens", admin, json={"principal": principal, "role": role, **extra}
    )
    assert done.status_code == 201, done.text
    return dict(done.json())


def ended(stack: Stack, token: str, run_id: str) -> dict[str, Any]:
    def status() -> dict[str, Any] | None:
        view = send(stack, "GET", f"/v1/runs/{run_id}", token).json()
        return view if view["status"] in TERMINAL else None

    return dict(wait_for(status, timeout=30, interval=0.2, what=f"{run_id} to end"))


def decisions(stack: Stack, token: str, run_id: str) -> dict[str, dict[str, Any]]:
    """Each node's (last) PolicyDecision, from the run's evidence."""
    events = send(stack, "GET", f"/v1/runs/{run_id}/evidence", token).json()
    return {e["payload"]["node_id"]: e["payload"] for e in events if e["kind"] == "PolicyDecision"}


def not_5xx(response: httpx.Response, *allowed: int) -> None:
    assert response.status_code in allowed, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json"


def repo_file(stack: Stack, relative: str, text: str) -> None:
    path = Path(stack.env["TOOLPLANE_REPO_ROOT"]) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- tokens: revocation reaches open streams --------------------------------------------------


@pytest.mark.timeout(90)
def test_a_revoked_tokens_open_event_stream_is_closed(stack: Stack) -> None:
    admin = stack.tenant()
    issued = issue(stack, admin, "streamer", "submitter")
    held = send(stack, "POST", "/v1/calls", issued["token"], json=PROD_READ).json()
    assert held["status"] == "awaiting_approval"  # waits up to an hour: the stream stays open
    lines: list[str] = []
    closed = threading.Event()
    client = httpx.Client(base_url=stack.url, timeout=httpx.Timeout(60))

    def follow() -> None:
        path = f"/v1/runs/{held['run_id']}/events"
        with contextlib.suppress(httpx.HTTPError):  # the test closes it if it stays open
            with client.stream("GET", path, headers=bearer(issued["token"])) as stream:
                for line in stream.iter_lines():
                    lines.append(line)
        closed.set()

    threading.Thread(target=follow, daemon=True).start()
    try:
        wait_for(lambda: any("awaiting_approval" in line for line in lines), timeout=10)
        revoked = send(stack, "DELETE", f"/v1/tokens/{issued['token_id']}", admin)
        assert revoked.status_code == 204
        assert closed.wait(20), "the revoked token's event stream is still streaming"
        assert not any("event: end" in line for line in lines)  # the run did not end
    finally:
        client.close()


# -- bad input must be 4xx, never a 500 ---------------------------------------------------------


def test_nul_characters_in_ids_are_refused_not_500(stack: Stack) -> None:
    admin = stack.tenant()
    cursor = json.dumps(["2020-01-01T00:00:00+00:00", "run_\x00"]).encode()
    crafted = base64.urlsafe_b64encode(cursor).decode().rstrip("=")
    for method, path, params in (
        ("GET", "/v1/runs/%00", None),
        ("GET", "/v1/runs/run_%00/evidence", None),
        ("GET", "/v1/runs/run_%00/events", None),
        ("POST", "/v1/runs/run_%00/cancel", None),
        ("DELETE", "/v1/tokens/tk_%00", None),
        ("GET", "/v1/runs", {"id": "run_\x00"}),
        ("GET", "/v1/runs", {"cursor": crafted}),
        ("GET", "/v1/ledger/verify", {"run": "run_\x00"}),
    ):
        body = {} if method == "POST" else None
        done = send(stack, method, path, admin, params=params, json=body)
        not_5xx(done, 404, 422)


def test_deeply_nested_or_unencodable_arguments_are_422_not_500(stack: Stack) -> None:
    admin = stack.tenant()
    nested = "[" * 600 + "]" * 600
    for path, raw in (
        (
            "/v1/calls",
            '{"tool": "lint_python", "args": {"code": "x", "select": %s}}'.replace("%s", nested),
        ),
        (
            "/v1/policy/explain",
            '{"tool": "lint_python", "args": {"select": %s}}'.replace("%s", nested),
        ),
        (
            "/v1/calls/batch",
            '{"calls": [{"tool": "lint_python", "args": {"x": %s}}]}'.replace("%s", nested),
        ),
        ("/v1/policy/explain", '{"tool": "search_docs", "args": {"query": "\\ud800"}}'),
    ):
        done = send(
            stack, "POST", path, admin, content=raw, headers={"Content-Type": "application/json"}
        )
        not_5xx(done, 422)


def test_a_last_event_id_beyond_any_id_ends_the_stream_cleanly(stack: Stack) -> None:
    admin = stack.tenant()
    run = send(
        stack, "POST", "/v1/calls", admin, json={"tool": "search_docs", "args": {"query": "x"}}
    )
    run_id = run.json()["run_id"]
    ended(stack, admin, run_id)
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        headers = {**bearer(admin), "Last-Event-ID": "9" * 20}  # over PostgreSQL's bigint
        with client.stream("GET", f"/v1/runs/{run_id}/events", headers=headers) as stream:
            body = stream.read().decode()  # a broken stream raises here
    assert stream.status_code == 200 and "event: end" in body, body
    assert "id: " not in body  # nothing comes after an id past every id


# -- environment and classification -----------------------------------------------------------


def test_explain_decides_as_the_real_call_does(stack: Stack) -> None:
    """Explain must apply the bundle's data labels and name the tenant as intake does."""
    admin = stack.tenant()
    call = {"tool": "read_repo_file", "args": {"path": "secrets/token.txt"}}
    real = send(stack, "POST", "/v1/calls", admin, json=call).json()
    assert real["status"] == "denied"  # labelled restricted
    decided = decisions(stack, admin, real["run_id"])["read_repo_file"]
    explained = send(stack, "POST", "/v1/policy/explain", admin, json=call).json()
    assert explained["decision"] == decided["decision"] == "deny", explained
    assert explained["request"]["classification"] == decided["request"]["classification"]
    assert explained["request"]["tenant"] == decided["request"]["tenant"]


@pytest.mark.parametrize("path", ["./config/app.py", "src/../config/app.py", "config//app.py"])
def test_a_path_spelled_another_way_keeps_its_label(stack: Stack, path: str) -> None:
    """The stack's bundle has no plain-paths-only rule (an operator's may not either):
    a label must still see the file the tool will read."""
    admin = stack.tenant()
    run = send(
        stack, "POST", "/v1/calls", admin, json={"tool": "read_repo_file", "args": {"path": path}}
    )
    decided = decisions(stack, admin, run.json()["run_id"])["read_repo_file"]
    assert decided["request"]["classification"] == "confidential", decided["request"]


def _bundle_where_labelled_prod_reads_need_approval(stack: Stack, tmp: Path) -> Path:
    policy = tmp / "policy"
    shutil.copytree(stack.env["TOOLPLANE_POLICY_DIR"], policy)
    cedar = policy / "policies.cedar"
    text = re.sub(
        r'@id\("no-confidential-repo-reads-in-prod"\).*?\};\n', "", cedar.read_text(), flags=re.S
    )
    cedar.write_text(text)
    constraints = json.loads((policy / "constraints.json").read_text())
    constraints["rules"].append(
        {"tool": "read_repo_file", "classification": "confidential", "limits": {"timeout_s": 2}}
    )
    (policy / "constraints.json").write_text(json.dumps(constraints))
    return policy


def test_an_approved_call_is_dispatched_under_its_labelled_classification(
    stack: Stack, tmp_path: Path
) -> None:
    """The constraints of a call decided at `confidential` (by a label) bind its dispatch,
    whether it was allowed at once or approved later."""
    from control.ops.runtime import ControlPlane
    from control.orchestration.operations import Operations

    admin = stack.tenant()
    submitter = issue(stack, admin, "agent", "submitter")["token"]
    approver = issue(stack, admin, "reviewer", "approver")["token"]
    settings = stack.settings().model_copy(
        update={"policy_dir": _bundle_where_labelled_prod_reads_need_approval(stack, tmp_path)}
    )
    plane = ControlPlane.from_settings(settings)
    as_submitter = Operations(plane, token=submitter)
    stack.clients.append(as_submitter)
    run_id = as_submitter.submit("read_repo_file", {"path": "config/app.py"}, environment="prod")
    assert as_submitter.run(run_id).status == "awaiting_approval"
    Operations(plane, token=approver).approve(run_id, "read_repo_file", reason="checked")
    events = send(stack, "GET", f"/v1/runs/{run_id}/evidence", admin).json()
    decided = next(e["payload"] for e in events if e["kind"] == "PolicyDecision")
    assert decided["request"]["classification"] == "confidential"
    dispatched = next(e["payload"] for e in events if e["kind"] == "ToolCallDispatched")
    limits = dispatched["envelope"]["envelope"]["limits"] or {}
    assert limits.get("timeout_s") == 2, limits


@pytest.mark.xfail(strict=True, reason="finding: labels do not follow data into later nodes")
def test_data_read_at_a_label_keeps_it_in_the_nodes_that_use_it(stack: Stack) -> None:
    """repo-review lints what it read: content read at `confidential` must not be handed to
    the next tool decided at the run's `internal`."""
    repo_file(stack, "config/app.py", 'PASSWORD = "hunter2"\n')
    admin = stack.tenant()
    inputs = {"query": "x", "path": "config/app.py"}
    run = send(stack, "POST", "/v1/runs", admin, json={"workflow": "repo-review", "inputs": inputs})
    ended(stack, admin, run.json()["run_id"])
    decided = decisions(stack, admin, run.json()["run_id"])
    assert decided["read"]["request"]["classification"] == "confidential"
    assert decided["lint"]["request"]["classification"] == "confidential", decided["lint"]


# -- approvals --------------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="finding: the issuer check is one hop deep (lead decides)")
def test_an_admin_cannot_approve_its_own_call_through_a_token_chain(stack: Stack) -> None:
    """docs/policy.md: an admin who submits cannot mint a token for an approver and approve
    as them. Minting an admin first, and the approver through it, must not get around it."""
    admin = stack.tenant()
    held = send(stack, "POST", "/v1/calls", admin, json=PROD_READ).json()
    assert held["status"] == "awaiting_approval"
    deputy = issue(stack, admin, "deputy", "admin")["token"]
    puppet = issue(stack, deputy, "puppet", "approver")["token"]
    path = f"/v1/runs/{held['run_id']}/nodes/read_repo_file/approve"
    refused = send(stack, "POST", path, puppet, json={})
    not_5xx(refused, 403)


@pytest.mark.xfail(strict=True, reason="finding: a token's environment binds only its submissions")
def test_an_approver_bound_to_dev_cannot_approve_a_prod_call(stack: Stack) -> None:
    admin = stack.tenant()
    submitter = issue(stack, admin, "agent", "submitter")["token"]
    dev_approver = issue(stack, admin, "dev-reviewer", "approver", environment="dev")["token"]
    held = send(stack, "POST", "/v1/calls", submitter, json=PROD_READ).json()
    assert held["status"] == "awaiting_approval" and held["environment"] == "prod"
    path = f"/v1/runs/{held['run_id']}/nodes/read_repo_file/approve"
    not_5xx(send(stack, "POST", path, dev_approver, json={}), 403)


# -- batches ----------------------------------------------------------------------------------


def test_a_refused_batch_runs_nothing_and_names_the_call_at_fault(stack: Stack) -> None:
    admin = stack.tenant()
    calls = [
        {"tool": "search_docs", "args": {"query": "first"}},
        {"tool": "search_docs", "args": {"query": "second"}},
        {"tool": "search_docs", "args": {"nope": 1}},
    ]
    refused = send(stack, "POST", "/v1/calls/batch", admin, json={"calls": calls})
    not_5xx(refused, 422)
    assert refused.json()["field"].startswith("calls.2."), refused.json()
    assert send(stack, "GET", "/v1/runs", admin).json()["runs"] == []  # nothing ran
    one_key = [dict(c, idempotency_key="same") for c in calls[:2]]
    conflict = send(stack, "POST", "/v1/calls/batch", admin, json={"calls": one_key})
    not_5xx(conflict, 409)
    assert conflict.json()["field"] == "calls.1.idempotency_key", conflict.json()
    assert send(stack, "GET", "/v1/runs", admin).json()["runs"] == []


# -- what problems say ------------------------------------------------------------------------


def test_problems_do_not_name_the_servers_files(stack: Stack) -> None:
    admin = stack.tenant()
    unknown = send(stack, "POST", "/v1/runs", admin, json={"workflow": "nope", "inputs": {}})
    not_5xx(unknown, 422)
    assert "/" not in unknown.json()["detail"], unknown.json()


def test_readyz_does_not_tell_strangers_where_the_database_is(stack: Stack) -> None:
    """/readyz needs no token: a failing check says which service, not its address,
    user or error text (those go to the log)."""
    from control.api.app import build_app
    from control.ops.runtime import ControlPlane

    dead = "postgresql://toolplane_runtime:s3cret@127.0.0.1:1/toolplane"
    plane = ControlPlane(
        stack.settings(), broker_url=stack.env["TOOLPLANE_BROKER_URL"], database_url=dead
    )
    app = build_app(plane)

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.get("/readyz")

    answer = asyncio.run(ask())
    assert answer.status_code == 503
    detail = answer.json()["detail"]
    for secret in ("127.0.0.1", "port", "toolplane_runtime", "s3cret", "refused"):
        assert secret not in detail, detail


# -- the CLI when the API says something unexpected -------------------------------------------


@pytest.fixture
def odd_api() -> Any:
    """An HTTP server that answers every request with what the test set in ``answer``."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(answer["status"])
            self.send_header("Content-Type", answer["type"])
            self.send_header("Content-Length", str(len(answer["body"])))
            self.end_headers()
            self.wfile.write(answer["body"])

        do_GET = do_POST = _answer  # noqa: N815 - the http.server API

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()


def test_the_cli_says_in_one_line_what_an_odd_answer_was(stack: Stack, odd_api: Any) -> None:
    url, answer = odd_api
    env = {"TOOLPLANE_URL": url, "TOOLPLANE_TOKEN": "tp_" + "x" * 43}
    answer.update(status=200, type="text/html", body=b"<html>captive portal</html>")
    for command in (("runs", "list"), ("call", "search_docs", "--arg", "query=x")):
        done = stack.cli(*command, env=env, timeout=60)
        assert done.returncode == 1, done.stderr
        assert "traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
        assert "200" in done.stderr and "text/html" in done.stderr, done.stderr
    evil = {"detail": "\x1b[2J\x1b]0;owned\x07", "code": "invalid_argument", "status": 422}
    answer.update(status=422, type="application/problem+json", body=json.dumps(evil).encode())
    done = stack.cli("runs", "list", env=env, timeout=60)
    assert done.returncode == 2 and "\x1b" not in done.stderr and "\x07" not in done.stderr
    assert "\\x1b[2J" in done.stderr, done.stderr


# -- what one token can make the control process do -------------------------------------------


@pytest.mark.timeout(120)
def test_concurrent_ledger_verifies_do_not_multiply_processes(stack: Stack) -> None:
    """A chain past ledger.verify.PARALLEL_FROM is verified by a pool of cpu_count
    processes, spawned for each request: an auditor's concurrent verifies must not
    multiply them in the control process (which also ingests every result)."""
    import os

    import psutil

    from control.governance.auth import Role
    from ledger.chain import NewEvent
    from ledger.store import append_events
    from ledger.verify import PARALLEL_FROM

    admin = stack.tenant()
    auditor = issue(stack, admin, "auditor", Role.AUDITOR.value)["token"]
    tenant = stack.client(admin).identity.tenant_id
    with stack.client(admin).plane.sessions() as session:  # a busy tenant's evidence
        events = [NewEvent("RunSubmitted", {"i": i}, tenant_id=tenant) for i in range(500)]
        for _ in range(PARALLEL_FROM // 500 + 1):
            append_events(session, events)
        session.commit()
    control = psutil.Process(stack.pid("control"))
    peak, done = 0, threading.Event()

    def verify() -> None:
        send(stack, "GET", "/v1/ledger/verify", auditor)

    workers = [threading.Thread(target=verify) for _ in range(4)]
    for worker in workers:
        worker.start()
    while any(w.is_alive() for w in workers):
        peak = max(peak, len(control.children(recursive=True)))
        done.wait(0.02)
    assert peak <= (os.cpu_count() or 1) + 1, f"{peak} processes under the control process"


def test_listing_runs_does_not_carry_every_result(stack: Stack) -> None:
    """GET /v1/runs?limit=1000 builds every run's results (up to 1 MB a node) in the
    control's memory, about four times over: any role can ask for a tenant's 1000 largest."""
    repo_file(stack, "src/big.py", ("x = 1  # " + "a" * 80 + "\n") * 10_000)  # 0.9 MB
    admin = stack.tenant()
    call = {"tool": "read_repo_file", "args": {"path": "src/big.py"}}
    for _ in range(2):
        ended(stack, admin, send(stack, "POST", "/v1/calls", admin, json=call).json()["run_id"])
    listed = send(stack, "GET", "/v1/runs", admin, params={"limit": 1000})
    assert listed.status_code == 200
    assert len(listed.content) < 1_000_000, f"{len(listed.content)} bytes for two runs"
