"""The console's pure parts: sealed sessions, cookie flags under TLS, CSRF checks, the
shapes its pages show (policy reasons, graph layout, the inbox's rules)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from starlette.requests import Request
from starlette.responses import Response

from control.api.console.guard import CsrfRefused, form_of, set_cookie
from control.api.console.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    open_session,
    seal,
)
from control.api.console.views import graph_of, held_calls, policy_notes
from control.errors import ServiceUnavailable
from control.orchestration.runs import NodeView, RunView


def request(scheme: str = "http", body: bytes = b"", origin: str | None = None) -> Request:
    headers = [(b"host", b"console.example")]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "scheme": scheme,
        "path": "/console/x",
        "headers": headers,
        "query_string": b"",
        "server": ("console.example", 443 if scheme == "https" else 80),
    }
    return Request(scope, receive)


def test_a_session_record_opens_only_with_its_id() -> None:
    record = seal("sid-1", "tp_secret", "csrf", 1e10)
    assert "tp_secret" not in record
    opened = open_session("sid-1", record)
    assert opened is not None and opened.token == "tp_secret"
    assert open_session("sid-2", record) is None
    store = MemorySessionStore()
    sid, session = store.create("tp_other")
    assert store.get(sid) == session and store.get(sid + "x") is None
    store.delete(sid)
    assert store.get(sid) is None


@pytest.mark.parametrize(("scheme", "secure"), [("https", True), ("http", False)])
def test_the_cookie_is_secure_under_tls(scheme: str, secure: bool) -> None:
    response = Response()
    set_cookie(request(scheme), response, "tp_console", "v", max_age=60)
    flags = [f.strip().lower() for f in response.headers["set-cookie"].split(";")]
    assert "httponly" in flags and "samesite=strict" in flags
    assert ("secure" in flags) is secure


def test_a_form_needs_its_csrf_token_and_this_origin() -> None:
    good = b"csrf=abc&action=approve"
    form = asyncio.run(form_of(request(body=good, origin="http://console.example"), "abc"))
    assert form == {"csrf": "abc", "action": "approve"}
    for body, origin, expected in (
        (b"action=approve", None, "abc"),
        (b"csrf=abd&action=approve", None, "abc"),
        (good, "http://evil.example", "abc"),
        (good, "null", "abc"),
        (good, None, None),
    ):
        with pytest.raises(CsrfRefused):
            asyncio.run(form_of(request(body=body, origin=origin), expected))


def test_policy_reasons_come_from_the_comment_above_each_id() -> None:
    text = (
        '// Reads in production\n// wait for a human.\n@id("held")\n@approval("1h")\n'
        'forbid (principal, action, resource);\n\n@id("bare")\npermit (principal, action, resource);\n'
    )
    assert policy_notes(text) == {"held": "Reads in production wait for a human.", "bare": ""}


def node(node_id: str, needs: tuple[str, ...] = (), **extra: Any) -> NodeView:
    return NodeView(node_id, "t", "pending", 0, None, None, None, None, {}, needs=needs, **extra)


def test_the_graph_puts_each_node_after_what_it_needs() -> None:
    graph = graph_of((node("a"), node("b", ("a",)), node("c", ("a",)), node("d", ("b", "c"))))
    x = {b.node_id: b.x for b in graph.boxes}
    assert x["a"] < x["b"] == x["c"] < x["d"] and len(graph.edges) == 4


def test_the_submitter_and_other_roles_may_not_decide() -> None:
    approval = {
        "status": "pending",
        "requested_by": "agent",
        "expires_at": "2099-01-01T00:00:00+00:00",
        "policies": ["held"],
    }
    run = RunView(
        "run_1", "t", "call", "awaiting_approval", "prod", "internal",
        "2026-01-01T00:00:00+00:00",
        (NodeView("n", "t", "awaiting_approval", 0, None, None, None, None, {"p": "<b>"},
                  approval=approval),),
        submitter="agent",
    )  # fmt: skip
    notes = {"held": "why"}
    mine = held_calls([run], principal="agent", approver=False, role="submitter", notes=notes)
    assert not mine[0].can_decide and "no self-approval" in mine[0].rule
    other = held_calls([run], principal="bob", approver=False, role="auditor", notes=notes)
    assert not other[0].can_decide and "approvers only" in other[0].rule
    ok = held_calls([run], principal="alice", approver=True, role="approver", notes=notes)
    assert ok[0].can_decide and ok[0].policies == [("held", "why")]


def test_a_session_store_that_cannot_be_reached_is_unavailable_not_a_crash() -> None:
    store = RedisSessionStore(
        redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, socket_timeout=0.5)
    )
    with pytest.raises(ServiceUnavailable, match="session store"):
        store.get("sid")
