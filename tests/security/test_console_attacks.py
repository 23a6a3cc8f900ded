"""An attacker's review of the review console (issue 18), over HTTP against the real
stack: forged and replayed forms, sessions that should be over, other tenants' objects,
roles that may not decide, hostile text in every field a page renders, and input meant
to break a page (deep JSON, bad UTF-8, bad query values) that must give a page naming
the problem, never a 500 or an error meant for the API's callers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from control.api.console import access
from control.api.console.guard import ConsoleHeaders
from control.api.console.sessions import LIFETIME_S, RedisSessionStore, open_session, seal
from ledger.models import ApiToken
from tests.console_session import HELD, bearer, csrf_of, issue, sign_in
from tests.harness import Stack

pytestmark = pytest.mark.integration

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


@pytest.fixture
def api(stack: Stack) -> Any:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def held_call(api: httpx.Client, token: str, **extra: Any) -> tuple[str, str]:
    held = api.post("/v1/calls", json={**HELD, **extra}, headers=bearer(token)).json()
    assert held["status"] == "awaiting_approval", held
    return str(held["run_id"]), str(held["nodes"][0]["node_id"])


def status_of(api: httpx.Client, token: str, run_id: str) -> str:
    return str(api.get(f"/v1/runs/{run_id}", headers=bearer(token)).json()["status"])


def is_page(response: httpx.Response) -> bool:
    """A console page (HTML, with the console's headers), not the API's problem JSON."""
    return response.headers.get("content-type", "").startswith("text/html") and (
        "frame-ancestors 'none'" in response.headers.get("content-security-policy", "")
    )


# -- roles and tenants ---------------------------------------------------------------


def test_no_role_but_approver_and_no_other_tenant_can_decide(
    stack: Stack, api: httpx.Client
) -> None:
    admin, other_admin = stack.tenant(), stack.tenant()
    submitter = issue(api, admin, "agent", "submitter")
    run_id, node = held_call(api, submitter)
    decide = f"/console/runs/{run_id}/nodes/{node}/decide"
    other_approver = issue(api, other_admin, "boss", "approver")
    for token in (
        issue(api, admin, "reader", "auditor"),
        issue(api, admin, "agent2", "submitter"),
        admin,  # an admin is not an approver
    ):
        with sign_in(stack.url, token) as client:
            csrf = csrf_of(client.get("/console/inbox").text)
            for action in ("approve", "reject"):
                refused = client.post(decide, data={"action": action, "csrf": csrf, "reason": "x"})
                assert refused.status_code == 403 and is_page(refused), refused.text
    with sign_in(stack.url, other_approver) as client:  # another tenant's approver, by id
        csrf = csrf_of(client.get("/console/inbox").text)
        refused = client.post(decide, data={"action": "approve", "csrf": csrf})
        assert refused.status_code == 404 and is_page(refused)
        assert run_id not in refused.text
    assert status_of(api, submitter, run_id) == "awaiting_approval"


# -- CSRF and sessions ---------------------------------------------------------------


def test_forms_with_another_sessions_token_or_a_spent_one_are_refused(
    stack: Stack, api: httpx.Client
) -> None:
    admin = stack.tenant()
    submitter = issue(api, admin, "agent", "submitter")
    approver = issue(api, admin, "boss", "approver")
    run_id, node = held_call(api, submitter)
    decide = f"/console/runs/{run_id}/nodes/{node}/decide"
    with sign_in(stack.url, approver) as other:
        others = csrf_of(other.get("/console/inbox").text)
    with sign_in(stack.url, approver) as client:
        mine = csrf_of(client.get("/console/inbox").text)
        assert mine != others
        refused = client.post(decide, data={"action": "approve", "csrf": others})
        assert refused.status_code == 403
        for origin in ("null", "http://127.0.0.1.evil.example", "https://" + stack.url[7:]):
            cross = client.post(
                decide, data={"action": "approve", "csrf": mine}, headers={"Origin": origin}
            )
            assert cross.status_code == 403, origin
        # a JSON body, a method override, a GET: none is a form post the console takes
        as_json = client.post(decide, json={"action": "approve", "csrf": mine})
        assert as_json.status_code == 403
        override = client.post(
            f"/console/runs/{run_id}",
            data={"action": "approve", "csrf": mine, "_method": "POST"},
            headers={"X-HTTP-Method-Override": "POST"},
        )
        assert override.status_code == 405
        assert client.get(decide, params={"action": "approve", "csrf": mine}).status_code == 405
        cookie = client.cookies["tp_console"]
        assert client.post("/console/sign-out", data={"csrf": mine}).status_code == 303
    # after sign-out: the old cookie and its token decide nothing
    with httpx.Client(base_url=stack.url, timeout=30, cookies={"tp_console": cookie}) as stale:
        replayed = stale.post(decide, data={"action": "approve", "csrf": mine})
        assert replayed.status_code == 303 and "/console/sign-in" in replayed.headers["location"]
    assert status_of(api, submitter, run_id) == "awaiting_approval"


def test_sign_in_issues_a_fresh_session_and_cannot_be_forced(stack: Stack) -> None:
    admin = stack.tenant()
    planted = "attacker-chosen-session-id"
    with httpx.Client(base_url=stack.url, timeout=30, cookies={"tp_console": planted}) as client:
        page = client.get("/console/sign-in")
        assert page.status_code == 200
        # login CSRF: the sign-in form's token must match its own cookie, and come from here
        pre = csrf_of(page.text)
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}):
            forced = client.post(
                "/console/sign-in", data={"csrf": pre, "token": admin}, headers=headers
            )
            assert forced.status_code == 403
        done = client.post("/console/sign-in", data={"csrf": pre, "token": admin})
        assert done.status_code == 303
        issued = done.cookies["tp_console"]
        assert issued != planted and len(issued) >= 43  # 256 random bits, url-safe
    with httpx.Client(base_url=stack.url, timeout=30) as bare:
        for cookie in ("", "x" * 4000, "%C3%A9", issued + "x", issued[:-1]):
            bare.cookies.set("tp_console", cookie)
            got = bare.get("/console/inbox")
            assert got.status_code == 303, cookie
        bare.cookies.set("tp_console", issued)
        assert bare.get("/console/inbox").status_code == 200


def test_an_expired_token_ends_the_session(stack: Stack, api: httpx.Client) -> None:
    admin = stack.tenant()
    short = api.post(
        "/v1/tokens",
        json={"principal": "brief", "role": "auditor", "expires_in_s": 3600},
        headers=bearer(admin),
    )
    assert short.status_code == 201, short.text
    token_id = short.json()["token_id"]
    with sign_in(stack.url, short.json()["token"]) as client:
        assert client.get("/console/runs").status_code == 200
        with stack.client(admin).plane.sessions() as session:  # the token's hour passes
            session.execute(
                update(ApiToken)
                .where(ApiToken.id == token_id)
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
            session.commit()
        ended = client.get("/console/runs")
        assert ended.status_code == 303 and ended.headers["location"].endswith("?ended=1")


def test_every_authenticated_response_is_unframable_and_uncached(
    stack: Stack, api: httpx.Client
) -> None:
    admin = stack.tenant()
    submitter = issue(api, admin, "agent", "submitter")
    run_id, _ = held_call(api, submitter)
    with sign_in(stack.url, admin) as client:
        csrf = csrf_of(client.get("/console/inbox").text)
        responses = [
            client.get(path)
            for path in (
                "/console/inbox",
                "/console/runs",
                f"/console/runs/{run_id}",
                f"/console/runs/{run_id}/evidence",
                f"/console/runs/{run_id}/bundle",
                "/console/tools",
                "/console/explain",
                "/console/runs/nothing-here",
                "/console",
            )
        ]
        responses.append(client.post("/console/explain", data={"csrf": csrf, "tool": "x"}))
        responses.append(client.post("/console/runs/r/nodes/n/decide", data={"csrf": "no"}))
        for got in responses:
            where = (got.request.url.path, got.status_code)
            assert got.headers.get("cache-control") == "no-store", where
            assert "frame-ancestors 'none'" in got.headers["content-security-policy"], where
            assert got.headers["x-frame-options"] == "DENY", where
            assert got.headers["x-content-type-options"] == "nosniff", where
        bundle = responses[4]
        assert bundle.headers["content-disposition"] == (
            f'attachment; filename="{run_id}.bundle.json"'
        )


# -- hostile text in every field a page shows ----------------------------------------


def test_hostile_text_in_every_rendered_field_is_text(stack: Stack, api: httpx.Client) -> None:
    admin = stack.tenant()
    submitter = issue(api, admin, "agent", "submitter")
    approver = issue(api, admin, "boss", "approver")
    held = api.post(
        "/v1/calls",
        json={**HELD, "args": {"path": HOSTILE}, "on_behalf_of": HOSTILE},
        headers=bearer(submitter),
    ).json()
    assert held["status"] == "awaiting_approval", held
    run_id, node = held["run_id"], held["nodes"][0]["node_id"]
    with sign_in(stack.url, approver) as client:
        inbox = client.get("/console/inbox")
        csrf = csrf_of(inbox.text)
        done = client.post(
            f"/console/runs/{run_id}/nodes/{node}/decide",
            data={"action": "reject", "csrf": csrf, "reason": HOSTILE},
        )
        assert done.status_code == 303, done.text
        pages = [
            inbox,
            client.get(f"/console/runs/{run_id}"),
            client.get("/console/runs"),
            client.get(f"/console/runs/{run_id}/evidence"),
            client.post(
                "/console/explain",
                data={
                    "csrf": csrf,
                    "tool": "read_repo_file",
                    "on_behalf_of": HOSTILE,
                    "environment": HOSTILE,
                    "args": '{"path": "' + HOSTILE.replace('"', '\\"') + '"}',
                },
            ),
            client.post("/console/explain", data={"csrf": csrf, "tool": HOSTILE, "args": "{}"}),
            client.get("/console/runs", params={"status": HOSTILE[:40]}),
        ]
        for page in pages:
            assert page.status_code == 200 and is_page(page), page.text[:500]
            assert "<script>window" not in page.text and "<img src=x" not in page.text
            assert "&lt;script&gt;window.pwned" in page.text or "\\u003cscript" in page.text


# -- input meant to break a page -------------------------------------------------------


def test_explain_with_deep_duplicate_or_huge_json_names_the_field(stack: Stack) -> None:
    admin = stack.tenant()
    with sign_in(stack.url, admin) as client:
        csrf = csrf_of(client.get("/console/explain").text)
        asked = {"csrf": csrf, "tool": "read_repo_file"}
        for args in (
            '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
            '{"path": "README.md", "path": ".env"}',
            '{"a": NaN}',
            '{"a": ' + "9" * 5000 + "}",
        ):
            page = client.post("/console/explain", data={**asked, "args": args})
            assert page.status_code == 200 and is_page(page), (args[:40], page.text[:300])
            assert 'id="problem"' in page.text and "args" in page.text, args[:40]
            assert 'id="decision"' not in page.text, args[:40]


def test_malformed_requests_give_console_pages(stack: Stack) -> None:
    admin = stack.tenant()
    wrong: list[tuple[str, int, str]] = []

    def check(what: str, got: httpx.Response, codes: tuple[int, ...]) -> None:
        if got.status_code not in codes or not is_page(got) or "Traceback" in got.text:
            wrong.append((what, got.status_code, got.text[:200]))

    with sign_in(stack.url, admin) as client:
        csrf = csrf_of(client.get("/console/inbox").text)
        for path in (
            "/console/runs/%FF%FE",
            "/console/runs/%00",
            "/console/runs/%ED%A0%80/evidence",
            "/console/runs/%00/bundle",
            "/console/runs/" + "r" * 5000,
        ):
            check(path[:60], client.get(path), (404, 422))
        for path, params in (
            ("/console/runs", {"status": "x" * 41}),
            ("/console/runs", {"cursor": "%%%"}),
            ("/console/runs", {"cursor": "WzEsMl0"}),  # [1,2]
            ("/console/runs", {"cursor": "x" * 401}),
            ("/console/runs/r1/evidence", {"verify": "yes please"}),
            ("/console/sign-in", {"ended": "maybe"}),
        ):
            check(f"{path} {params}"[:80], client.get(path, params=params), (404, 422))
        for data in (
            b"csrf=" + csrf.encode() + b"&action=reject&reason=%FF%FE%00",
            b"csrf=" + csrf.encode() + b"&action=" + b"a" * 10_000,
            b"csrf=" + csrf.encode() + b"&action=reject&reason=" + b"r" * 100_000,
            b"csrf=" + csrf.encode() + b"&" + b"&".join(b"f%d=1" % i for i in range(50)),
            b"csrf=" + csrf.encode(),
            b"\xff\xfe\x00csrf",
        ):
            got = client.post(
                "/console/runs/r1/nodes/n1/decide",
                content=data,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            check(f"decide {data[:50]!r}", got, (403, 404, 422))
        for path in ("/console/runs/%00/nodes/n1/decide", "/console/runs/r1/nodes/%00/decide"):
            got = client.post(path, data={"csrf": csrf, "action": "approve"})
            check(path, got, (403, 404, 422))
    assert not wrong, wrong


def test_a_session_store_outage_page_names_no_host_or_port() -> None:
    """With the session store down, anyone with any cookie gets a 503 page; it must not
    tell them where the control's Redis is (the API's own 503 names only the service)."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = FastAPI()
    app.state.console_sessions = RedisSessionStore.from_url(f"redis://127.0.0.1:{port}/0")
    app.include_router(access.router)
    app.add_middleware(ConsoleHeaders)

    async def visit() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://console.test", cookies={"tp_console": "any"}
        ) as client:
            return await client.get("/console/sign-in")

    page = asyncio.run(visit())
    assert page.status_code == 503 and is_page(page), page.text
    assert "redis unavailable" in page.text
    assert str(port) not in page.text and "127.0.0.1" not in page.text


def test_a_stored_session_record_cannot_be_altered_to_live_longer_or_take_a_known_csrf() -> None:
    """Whoever can write the store but has no session id (the store keeps only a hash of
    it) must not be able to stretch a session past its 12 hours or plant a CSRF secret
    they know: both are bound to the sealed token."""
    record = seal("sid-1", "tp_secret", "csrf-secret", time.time() - LIFETIME_S - 60)
    assert open_session("sid-1", record) is None  # too old
    fresh = json.loads(record)
    for change in ({"opened_at": time.time()}, {"csrf": "attacker-knows-this"}):
        altered = json.dumps({**fresh, **change})
        assert open_session("sid-1", altered) is None, change
