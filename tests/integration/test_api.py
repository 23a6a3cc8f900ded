"""The HTTP API over raw HTTP against the real stack: authentication, roles, tenancy,
bad input, idempotency, batches, pagination and the event stream."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from ledger.models import ApiToken, RunEvent
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def http(stack: Stack) -> Any:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def issue(http: httpx.Client, admin: str, principal: str, role: str, **extra: Any) -> str:
    done = http.post(
        "/v1/tokens", json={"principal": principal, "role": role, **extra}, headers=bearer(admin)
    )
    assert done.status_code == 201, done.text
    return str(done.json()["token"])


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["code"] == code, body
    assert body["title"] and body["detail"] and body["type"]
    return dict(body)


# -- authentication ------------------------------------------------------------------------


def test_no_token_bad_token_expired_and_revoked_are_401(stack: Stack, http: httpx.Client) -> None:
    admin = stack.tenant()
    body = {"tool": "search_docs", "args": {"query": "x"}}
    missing = problem(http.post("/v1/calls", json=body), 401, "unauthorized")
    assert "no token" in missing["detail"]
    assert http.get("/v1/runs").headers["www-authenticate"] == "Bearer"
    problem(http.get("/v1/runs", headers=bearer("tp_" + "x" * 43)), 401, "unauthorized")
    problem(http.get("/v1/runs", headers={"Authorization": "Basic abc"}), 401, "unauthorized")

    expiring = issue(http, admin, "short-lived", "submitter", expires_in_s=3600)
    assert http.get("/v1/runs", headers=bearer(expiring)).status_code == 200
    with stack.client(admin).plane.sessions() as session:  # its hour has passed
        session.execute(
            update(ApiToken)
            .where(ApiToken.expires_at.is_not(None))
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        session.commit()
    expired = problem(http.get("/v1/runs", headers=bearer(expiring)), 401, "unauthorized")
    assert "expired" in expired["detail"]

    revoked = issue(http, admin, "to-revoke", "submitter")
    token_id = next(
        t["token_id"]
        for t in http.get("/v1/tokens", headers=bearer(admin)).json()
        if t["principal"] == "to-revoke"
    )
    assert http.delete(f"/v1/tokens/{token_id}", headers=bearer(admin)).status_code == 204
    gone = problem(http.get("/v1/runs", headers=bearer(revoked)), 401, "unauthorized")
    assert "revoked" in gone["detail"]


def test_a_submitter_cannot_do_what_admins_and_approvers_do(
    stack: Stack, http: httpx.Client
) -> None:
    admin = stack.tenant()
    submitter = issue(http, admin, "agent", "submitter")
    as_submitter = bearer(submitter)
    for method, path, body in (
        ("POST", "/v1/tokens", {"principal": "mine", "role": "admin"}),
        ("GET", "/v1/tokens", None),
        ("POST", "/v1/freeze", {"reason": "no"}),
        ("POST", "/v1/freeze", {"reason": "no", "all": True}),
        ("POST", "/v1/unfreeze", {"reason": "no"}),
    ):
        refused = problem(
            http.request(method, path, json=body, headers=as_submitter), 403, "forbidden"
        )
        assert "submitter role cannot" in refused["detail"], refused
    held = http.post(
        "/v1/calls",
        json={"tool": "read_repo_file", "args": {"path": "README.md"}, "environment": "prod"},
        headers=as_submitter,
    ).json()
    assert held["status"] == "awaiting_approval"
    node = held["nodes"][0]["node_id"]
    approve = f"/v1/runs/{held['run_id']}/nodes/{node}/approve"
    refused = problem(http.post(approve, json={}, headers=as_submitter), 403, "forbidden")
    assert "cannot" in refused["detail"]
    # an admin may not approve either, nor freeze every tenant without an operator tenant
    problem(http.post(approve, json={}, headers=bearer(admin)), 403, "forbidden")
    problem(
        http.post("/v1/freeze", json={"reason": "x", "all": True}, headers=bearer(admin)),
        403,
        "forbidden",
    )


def same_bytes(other: httpx.Response, unknown: httpx.Response, ident: str, never: str) -> None:
    """What another tenant's id gets is what an id that never existed gets (the id aside)."""
    assert other.status_code == unknown.status_code == 404
    assert other.content.replace(ident.encode(), never.encode()) == unknown.content
    assert other.headers["content-type"] == unknown.headers["content-type"]


def test_another_tenants_objects_are_404_byte_for_byte(stack: Stack, http: httpx.Client) -> None:
    mine, theirs = stack.tenant(), stack.tenant()
    my_approver = issue(http, mine, "my-approver", "approver")
    run = http.post(
        "/v1/calls", json={"tool": "search_docs", "args": {"query": "x"}}, headers=bearer(theirs)
    ).json()
    their_token = http.get("/v1/tokens", headers=bearer(theirs)).json()[0]["token_id"]
    never = "run_" + secrets.token_hex(10)
    for path in (
        "/v1/runs/{}",
        "/v1/runs/{}/evidence",
        "/v1/runs/{}/events",
    ):
        other = http.get(path.format(run["run_id"]), headers=bearer(mine))
        unknown = http.get(path.format(never), headers=bearer(mine))
        problem(other, 404, "not_found")
        same_bytes(other, unknown, run["run_id"], never)
    for verb in ("approve", "reject"):
        path = "/v1/runs/{}/nodes/" + run["nodes"][0]["node_id"] + "/" + verb
        body = {"reason": "mine now"}
        other = http.post(path.format(run["run_id"]), json=body, headers=bearer(my_approver))
        unknown = http.post(path.format(never), json=body, headers=bearer(my_approver))
        same_bytes(other, unknown, run["run_id"], never)
    other = http.post(f"/v1/runs/{run['run_id']}/cancel", json={}, headers=bearer(mine))
    unknown = http.post(f"/v1/runs/{never}/cancel", json={}, headers=bearer(mine))
    same_bytes(other, unknown, run["run_id"], never)
    never_token = "tk_" + secrets.token_hex(10)
    other = http.delete(f"/v1/tokens/{their_token}", headers=bearer(mine))
    unknown = http.delete(f"/v1/tokens/{never_token}", headers=bearer(mine))
    same_bytes(other, unknown, their_token, never_token)
    listed = http.get("/v1/runs", params={"id": run["run_id"]}, headers=bearer(mine)).json()
    assert listed["runs"] == []
    # and their run was not touched
    assert http.get(f"/v1/runs/{run['run_id']}", headers=bearer(theirs)).status_code == 200


# -- bad input -------------------------------------------------------------------------------


def test_oversized_and_malformed_bodies(stack: Stack, http: httpx.Client) -> None:
    admin = bearer(stack.tenant())
    big = {"tool": "lint_python", "args": {"code": "x" * 2_000_000}}
    too_large = problem(http.post("/v1/calls", json=big, headers=admin), 413, "too_large")
    assert too_large["field"] == "body"
    chunked = http.post(  # no Content-Length: counted as it streams
        "/v1/calls",
        content=iter([b'{"tool": "lint_python", "args": {"code": "', b"x" * 2_000_000, b'"}}']),
        headers={**admin, "Content-Type": "application/json"},
    )
    problem(chunked, 413, "too_large")
    broken = http.post(
        "/v1/calls", content=b'{"tool": ', headers={**admin, "Content-Type": "application/json"}
    )
    assert problem(broken, 422, "invalid_argument")["field"]
    cases = [
        ({"args": {}}, "tool", "Field required"),
        ({"tool": "search_docs", "args": []}, "args", "valid dictionary"),
        ({"tool": "search_docs", "args": {}, "evil": 1}, "evil", "Extra inputs"),
        ({"tool": "a/b", "args": {}}, "tool", "pattern"),
        ({"tool": "search_docs", "args": {"query": 5}}, "args.query", "not of type 'string'"),
        ({"tool": "search_docs", "args": {"query": "x", "nope": 1}}, "args.nope", "unexpected"),
        ({"tool": "nope", "args": {}}, "tool", "unknown tool"),
        ({"tool": "search_docs", "args": {"query": "x"}, "environment": "moon"}, "environment", ""),
    ]
    for body, field, rule in cases:
        refused = problem(http.post("/v1/calls", json=body, headers=admin), 422, "invalid_argument")
        assert refused["field"] == field, (body, refused)
        assert rule in refused["detail"], (body, refused)
        assert refused["detail"].startswith(field), refused
    problem(http.get("/v1/runs", params={"limit": 0}, headers=admin), 422, "invalid_argument")
    problem(http.get("/v1/runs", params={"cursor": "%%%"}, headers=admin), 422, "invalid_argument")
    problem(http.get("/v1/nothing-here", headers=admin), 404, "not_found")
    problem(http.put("/v1/calls", json={}, headers=admin), 405, "method_not_allowed")


def test_idempotency_key_same_body_same_run_other_body_409(
    stack: Stack, http: httpx.Client
) -> None:
    admin = bearer(stack.tenant())
    key = f"key-{secrets.token_hex(4)}"
    body = {"tool": "search_docs", "args": {"query": "receipts"}}
    first = http.post("/v1/calls", json=body, headers={**admin, "Idempotency-Key": key})
    again = http.post("/v1/calls", json=body, headers={**admin, "Idempotency-Key": key})
    assert first.status_code == again.status_code == 201
    assert first.json()["run_id"] == again.json()["run_id"]
    other = {"tool": "search_docs", "args": {"query": "something else"}}
    refused = problem(
        http.post("/v1/calls", json=other, headers={**admin, "Idempotency-Key": key}),
        409,
        "idempotency_conflict",
    )
    assert key in refused["detail"] and first.json()["run_id"] in refused["detail"]
    assert refused["field"] == "idempotency_key"
    workflow = {"workflow": "repo-review", "inputs": {"query": "q", "path": "src/shipit/deploy.py"}}
    started = http.post("/v1/runs", json=workflow, headers={**admin, "Idempotency-Key": key})
    problem(started, 409, "idempotency_conflict")


def test_a_batch_decides_each_call_on_its_own(stack: Stack, http: httpx.Client) -> None:
    admin = bearer(stack.tenant())
    calls = [
        {"tool": "search_docs", "args": {"query": "ledger"}},
        {"tool": "read_repo_file", "args": {"path": ".env"}},  # no-secret-files
        {"tool": "read_repo_file", "args": {"path": "README.md"}, "environment": "prod"},
        {"tool": "search_docs", "args": {"query": "x"}, "idempotency_key": "batch-1"},
    ]
    done = http.post("/v1/calls/batch", json={"calls": calls}, headers=admin)
    assert done.status_code == 201, done.text
    runs = done.json()["runs"]
    assert [r["status"] for r in runs][1:3] == ["denied", "awaiting_approval"]
    assert len({r["run_id"] for r in runs}) == 4
    assert runs[3]["idempotency_key"] == "batch-1"
    problem(
        http.post("/v1/calls/batch", json={"calls": []}, headers=admin), 422, "invalid_argument"
    )


def test_runs_list_pages_with_a_cursor_and_filters(stack: Stack, http: httpx.Client) -> None:
    admin = bearer(stack.tenant())
    made = [
        http.post(
            "/v1/calls", json={"tool": "search_docs", "args": {"query": str(i)}}, headers=admin
        ).json()["run_id"]
        for i in range(5)
    ]
    held = http.post(
        "/v1/calls",
        json={"tool": "read_repo_file", "args": {"path": "README.md"}, "environment": "prod"},
        headers=admin,
    ).json()["run_id"]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = http.get("/v1/runs", params=params, headers=admin).json()
        seen += [r["run_id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [held, *reversed(made)]
    waiting = http.get("/v1/runs", params={"awaiting_approval": "true"}, headers=admin).json()
    assert [r["run_id"] for r in waiting["runs"]] == [held]
    by_status = http.get("/v1/runs", params={"status": "awaiting_approval"}, headers=admin)
    assert [r["run_id"] for r in by_status.json()["runs"]] == [held]
    problem(
        http.get("/v1/runs", params={"status": "sleeping"}, headers=admin), 422, "invalid_argument"
    )


# -- the server decides the environment and classification ---------------------------------


def test_environment_and_classification_cannot_be_widened(stack: Stack, http: httpx.Client) -> None:
    admin = stack.tenant()
    prod_submitter = issue(http, admin, "prod-agent", "submitter", environment="prod")
    read = {"tool": "read_repo_file", "args": {"path": "README.md"}}
    asked_dev = http.post(
        "/v1/calls",
        json={**read, "environment": "dev", "classification": "public"},
        headers=bearer(prod_submitter),
    ).json()
    assert asked_dev["environment"] == "prod"
    assert asked_dev["classification"] == "internal"  # the deployment's floor
    assert asked_dev["status"] == "awaiting_approval"
    stricter = http.post(
        "/v1/calls", json={**read, "classification": "restricted"}, headers=bearer(admin)
    ).json()
    assert stricter["classification"] == "restricted" and stricter["status"] == "denied"
    # a prod-bound admin cannot mint a dev token
    prod_admin = issue(http, admin, "prod-admin", "admin", environment="prod")
    minted = http.post(
        "/v1/tokens",
        json={"principal": "escape", "role": "submitter", "environment": "dev"},
        headers=bearer(prod_admin),
    ).json()
    assert minted["environment"] == "prod"
    status = http.get("/v1/policy", headers=bearer(minted["token"])).json()
    assert (status["environment"], status["classification"]) == ("prod", "internal")


# -- the event stream --------------------------------------------------------------------------


def read_events(response: httpx.Response) -> list[dict[str, Any]]:
    events, current = [], {}
    for line in response.iter_lines():
        if not line:
            if current:
                events.append(current)
            current = {}
            continue
        field, _, value = line.partition(":")
        if field:
            current[field] = value.removeprefix(" ")
        if current.get("event") == "end" and "data" in current:
            events.append(current)
            break
    return events


def test_the_event_stream_delivers_every_change_in_order_and_resumes(
    stack: Stack, http: httpx.Client
) -> None:
    admin = bearer(stack.tenant())
    started = http.post(
        "/v1/runs",
        json={
            "workflow": "repo-review",
            "inputs": {"query": "receipts", "path": "src/shipit/deploy.py"},
        },
        headers=admin,
    ).json()
    run_id = started["run_id"]
    with http.stream("GET", f"/v1/runs/{run_id}/events", headers=admin) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    assert events[-1]["event"] == "end"
    changes = [e for e in events if e.get("id")]
    with stack.client(stack.tenant()).plane.sessions() as session:
        rows = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id)
        ).all()
    assert [int(e["id"]) for e in changes] == [r.id for r in rows]
    assert [json.loads(e["data"])["status"] for e in changes] == [r.status for r in rows]
    final = http.get(f"/v1/runs/{run_id}", headers=admin).json()
    assert json.loads(events[-1]["data"])["status"] == final["status"] == "completed"
    last_seen: dict[str, str] = {}
    for e in changes:
        data = json.loads(e["data"])
        last_seen[data["node_id"] or "run"] = data["status"]
    assert last_seen == {"run": "completed", **{n["node_id"]: n["status"] for n in final["nodes"]}}
    for node in final["nodes"]:  # each node was seen queued before completed
        statuses = [
            json.loads(e["data"])["status"]
            for e in changes
            if json.loads(e["data"])["node_id"] == node["node_id"]
        ]
        assert statuses.index("queued") < statuses.index("completed")
    # reconnect from the middle: exactly what came after, nothing twice
    middle = changes[len(changes) // 2]["id"]
    with http.stream(
        "GET", f"/v1/runs/{run_id}/events", headers={**admin, "Last-Event-ID": middle}
    ) as response:
        resumed = [e for e in read_events(response) if e.get("id")]
    assert [e["id"] for e in resumed] == [e["id"] for e in changes[len(changes) // 2 + 1 :]]


def test_a_follower_is_woken_by_commits_while_it_waits(stack: Stack, http: httpx.Client) -> None:
    """A run held for approval: the stream stays open, and the approval's changes arrive."""
    admin = stack.tenant()
    submitter = issue(http, admin, "sub", "submitter")
    approver = issue(http, admin, "boss", "approver")
    held = http.post(
        "/v1/calls",
        json={"tool": "read_repo_file", "args": {"path": "README.md"}, "environment": "prod"},
        headers=bearer(submitter),
    ).json()
    run_id, node = held["run_id"], held["nodes"][0]["node_id"]
    with httpx.Client(base_url=stack.url, timeout=30) as follower:
        with follower.stream("GET", f"/v1/runs/{run_id}/events", headers=bearer(submitter)) as r:
            lines = r.iter_lines()
            seen: list[str] = []
            for line in lines:  # read up to the run's awaiting_approval
                seen.append(line)
                if (
                    line.startswith("data:")
                    and '"awaiting_approval"' in line
                    and '"node_id":null' in line
                ):
                    break
            decided = http.post(
                f"/v1/runs/{run_id}/nodes/{node}/approve",
                json={"reason": "ok"},
                headers=bearer(approver),
            )
            assert decided.status_code == 200, decided.text
            for line in lines:
                seen.append(line)
                if line.startswith("event: end"):
                    break
    text = "\n".join(seen)
    assert '"status":"completed"' in text and "event: end" in text
    wait_for(
        lambda: (
            http.get(f"/v1/runs/{run_id}", headers=bearer(submitter)).json()["status"]
            == "completed"
        )
    )


def test_health_and_the_openapi_document(stack: Stack, http: httpx.Client) -> None:
    assert http.get("/livez").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["database"] == body["broker"] == "ok"
    assert len(body["policy"]) == 64  # the bundle's version: the hash of its files
    document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert "/v1/runs/{run_id}/events" in document["paths"]
    assert document["components"]["schemas"]["Problem"]["properties"]["code"]


def test_data_labels_raise_a_calls_classification(stack: Stack, http: httpx.Client) -> None:
    """The bundle's labels.json: config/* is confidential, secrets/* restricted, whatever the
    caller says; the decision records the classification it was made at."""
    admin = bearer(stack.tenant())
    secret = http.post(
        "/v1/calls",
        json={
            "tool": "read_repo_file",
            "args": {"path": "secrets/token.txt"},
            "classification": "public",
        },
        headers=admin,
    ).json()
    assert secret["status"] == "denied"
    assert "no-restricted-data" in secret["nodes"][0]["error"]["message"]
    config = http.post(
        "/v1/calls",
        json={"tool": "read_repo_file", "args": {"path": "config/app.toml"}, "environment": "prod"},
        headers=admin,
    ).json()
    assert config["status"] == "denied"
    assert "no-confidential-repo-reads-in-prod" in config["nodes"][0]["error"]["message"]
    decisions = [
        e["payload"]
        for e in http.get(f"/v1/runs/{config['run_id']}/evidence", headers=admin).json()
        if e["kind"] == "PolicyDecision"
    ]
    assert decisions[0]["request"]["classification"] == "confidential"
