"""The review console over plain HTTP against the real stack: its cookie, CSRF refusal,
tenant scoping, the session's end with its token, and untrusted text shown as text."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.console_session import HELD, bearer, csrf_of, issue, sign_in
from tests.harness import Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def api(stack: Stack) -> Any:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def test_the_session_cookie_and_the_security_headers(stack: Stack) -> None:
    admin = stack.tenant()
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        page = client.get("/console/sign-in")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert "<script src=" in page.text and "<script>" not in page.text  # no inline script
        done = client.post("/console/sign-in", data={"csrf": csrf_of(page.text), "token": admin})
        cookie = next(c for c in done.headers.get_list("set-cookie") if c.startswith("tp_console="))
        flags = [f.strip().lower() for f in cookie.split(";")]
        assert "httponly" in flags and "samesite=strict" in flags and "path=/console" in flags
        assert "secure" not in flags  # plain HTTP here; under TLS it is set (test_console_unit)
        assert admin not in cookie  # the token stays on the server
        inbox = client.get("/console/inbox")
        assert inbox.status_code == 200 and "Approvals" in inbox.text


def test_a_bad_token_does_not_sign_in(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        page = client.get("/console/sign-in")
        bad = client.post(
            "/console/sign-in", data={"csrf": csrf_of(page.text), "token": "tp_" + "x" * 43}
        )
        assert bad.status_code == 401
        assert not any(c.startswith("tp_console=") for c in bad.headers.get_list("set-cookie"))
        assert client.get("/console/inbox").status_code == 303  # to the sign-in page


def test_form_posts_without_the_csrf_token_are_refused(stack: Stack, api: httpx.Client) -> None:
    admin = stack.tenant()
    submitter = issue(api, admin, "agent", "submitter")
    approver = issue(api, admin, "boss", "approver")
    held = api.post("/v1/calls", json=HELD, headers=bearer(submitter)).json()
    run_id, node = held["run_id"], held["nodes"][0]["node_id"]
    with sign_in(stack.url, approver) as client:
        decide = f"/console/runs/{run_id}/nodes/{node}/decide"
        for data in ({"action": "approve"}, {"action": "approve", "csrf": "forged"}):
            refused = client.post(decide, data=data)
            assert refused.status_code == 403 and "CSRF" in refused.text
        token = csrf_of(client.get("/console/inbox").text)
        other_origin = client.post(
            decide,
            data={"action": "approve", "csrf": token},
            headers={"Origin": "http://evil.example"},
        )
        assert other_origin.status_code == 403
        assert client.post("/console/sign-out", data={}).status_code == 403
        assert client.get("/console/inbox").status_code == 200  # still signed in
    # the sign-in form's own token: a post without the cookie's value is refused
    with httpx.Client(base_url=stack.url, timeout=30) as bare:
        refused = bare.post("/console/sign-in", data={"csrf": "x", "token": approver})
        assert refused.status_code == 403
    run = api.get(f"/v1/runs/{run_id}", headers=bearer(submitter)).json()
    assert run["status"] == "awaiting_approval"  # nothing was decided


def test_another_tenants_run_is_the_same_not_found_page(stack: Stack, api: httpx.Client) -> None:
    mine, theirs = stack.tenant(), stack.tenant()
    run = api.post("/v1/calls", json=HELD, headers=bearer(theirs)).json()
    with sign_in(stack.url, mine) as client:
        pages = {}
        for name, run_id in (("theirs", run["run_id"]), ("unknown", "run_does_not_exist")):
            for suffix in ("", "/evidence", "/bundle", "/events"):
                got = client.get(f"/console/runs/{run_id}{suffix}")
                assert got.status_code == 404, (name, suffix, got.text)
                pages[(name, suffix)] = got.text
        for suffix in ("", "/evidence", "/bundle", "/events"):
            assert pages[("theirs", suffix)] == pages[("unknown", suffix)]
        assert run["run_id"] not in pages[("theirs", "")]
        assert run["run_id"] not in client.get("/console/inbox").text
        listed = client.get("/console/runs")
        assert listed.status_code == 200 and run["run_id"] not in listed.text


def test_revoking_the_token_or_signing_out_ends_the_session(
    stack: Stack, api: httpx.Client
) -> None:
    admin = stack.tenant()
    auditor = issue(api, admin, "reader", "auditor")
    with sign_in(stack.url, auditor) as client:
        assert client.get("/console/runs").status_code == 200
        token_id = next(
            t["token_id"]
            for t in api.get("/v1/tokens", headers=bearer(admin)).json()
            if t["principal"] == "reader"
        )
        assert api.delete(f"/v1/tokens/{token_id}", headers=bearer(admin)).status_code == 204
        ended = client.get("/console/runs")
        assert ended.status_code == 303 and ended.headers["location"].endswith("?ended=1")
    with sign_in(stack.url, admin) as client:
        cookie = client.cookies["tp_console"]
        token = csrf_of(client.get("/console/inbox").text)
        out = client.post("/console/sign-out", data={"csrf": token})
        assert out.status_code == 303
        replayed = httpx.get(f"{stack.url}/console/inbox", cookies={"tp_console": cookie})
        assert replayed.status_code == 303  # the old cookie opens nothing


def test_held_arguments_are_shown_as_text_and_the_submitter_cannot_approve(
    stack: Stack, api: httpx.Client
) -> None:
    admin = stack.tenant()
    submitter = issue(api, admin, "agent", "submitter")
    hostile = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
    held = api.post(
        "/v1/calls",
        json={"tool": "read_repo_file", "args": {"path": hostile}, "environment": "prod"},
        headers=bearer(submitter),
    ).json()
    assert held["status"] == "awaiting_approval", held
    run_id, node = held["run_id"], held["nodes"][0]["node_id"]
    with sign_in(stack.url, submitter) as client:
        inbox = client.get("/console/inbox").text
        assert "<script>window.pwned" not in inbox and "&lt;script&gt;window.pwned" in inbox
        assert "prod-repo-reads-outside-src-need-approval" in inbox
        assert "waits for a" in inbox  # the policy's own reason
        assert "no self-approval" in inbox and "disabled" in inbox
        token = csrf_of(inbox)
        forced = client.post(
            f"/console/runs/{run_id}/nodes/{node}/decide", data={"action": "approve", "csrf": token}
        )
        assert forced.status_code == 403
    run = api.get(f"/v1/runs/{run_id}", headers=bearer(submitter)).json()
    assert run["status"] == "awaiting_approval"


def test_the_runs_list_filters_and_pages(stack: Stack, api: httpx.Client) -> None:
    admin = stack.tenant()
    denied = {"tool": "read_repo_file", "args": {"path": ".env"}}  # no-secret-files
    done = api.post("/v1/calls/batch", json={"calls": [denied] * 26}, headers=bearer(admin))
    assert done.status_code == 201, done.text
    assert {r["status"] for r in done.json()["runs"]} == {"denied"}
    with sign_in(stack.url, admin) as client:
        first = client.get("/console/runs", params={"status": "denied"})
        assert first.status_code == 200 and first.text.count('class="status status-denied"') == 25
        cursor = first.text.split('id="next-page" href="', 1)[1].split('"', 1)[0]
        second = client.get(cursor.replace("&amp;", "&"))
        assert second.text.count('class="status status-denied"') == 1
        assert 'id="next-page"' not in second.text
        none = client.get("/console/runs", params={"status": "completed"})
        assert "No runs with status completed" in none.text


def test_the_tools_page_and_the_explain_form(stack: Stack, api: httpx.Client) -> None:
    admin = stack.tenant()
    with sign_in(stack.url, admin) as client:
        tools = client.get("/console/tools")
        assert tools.status_code == 200
        assert "read_repo_file" in tools.text and "Argument schema" in tools.text
        form = client.get("/console/explain")
        token = csrf_of(form.text)
        asked = {
            "csrf": token,
            "tool": "read_repo_file",
            "environment": "prod",
            "args": '{"path": "README.md"}',
        }
        held = client.post("/console/explain", data=asked)
        assert held.status_code == 200, held.text
        assert "approval_required" in held.text
        assert "prod-repo-reads-outside-src-need-approval" in held.text
        bad = client.post("/console/explain", data={**asked, "args": "{not json"})
        assert bad.status_code == 200 and "args: is not JSON" in bad.text
        listed = client.post("/console/explain", data={**asked, "args": "[1]"})
        assert "args: must be a JSON object" in listed.text
        refused = client.post("/console/explain", data={**asked, "csrf": ""})
        assert refused.status_code == 403


def test_an_approver_rejects_with_a_reason(stack: Stack, api: httpx.Client) -> None:
    admin = stack.tenant()
    submitter = issue(api, admin, "agent", "submitter")
    approver = issue(api, admin, "boss", "approver")
    held = api.post("/v1/calls", json=HELD, headers=bearer(submitter)).json()
    run_id, node = held["run_id"], held["nodes"][0]["node_id"]
    with sign_in(stack.url, approver) as client:
        inbox = client.get("/console/inbox").text
        assert run_id in inbox and "no self-approval" not in inbox
        decide = f"/console/runs/{run_id}/nodes/{node}/decide"
        token = csrf_of(inbox)
        bare = client.post(decide, data={"action": "reject", "csrf": token})
        assert bare.status_code == 422 and "reason: a rejection needs a reason" in bare.text
        done = client.post(decide, data={"action": "reject", "csrf": token, "reason": "<i>no</i>"})
        assert done.status_code == 303 and done.headers["location"] == f"/console/runs/{run_id}"
        page = client.get(done.headers["location"]).text
        assert "&lt;i&gt;no&lt;/i&gt;" in page and "<i>no</i>" not in page
        assert run_id not in client.get("/console/inbox").text
    run = api.get(f"/v1/runs/{run_id}", headers=bearer(submitter)).json()
    assert run["status"] == "denied" and run["nodes"][0]["approval"]["status"] == "rejected"
