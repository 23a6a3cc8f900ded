"""Who may read the metrics: the control's ``GET /metrics`` answers only an admin of an
operator tenant (every tenant's counts are the operator's, never a tenant's), and a
sandbox worker serves none unless its operator asks for it."""

from __future__ import annotations

import httpx
import psutil
import pytest

from control.api.routes.metrics import RULE
from tests.harness import Stack
from tests.integration.govern import operator_admin

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def get_metrics(stack: Stack, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(stack.url + "/metrics", headers=headers, timeout=30)


def refused(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["code"] == code, body
    assert RULE in body["detail"], body  # the problem names the rule
    assert "toolplane_" not in response.text
    return str(body["detail"])


def issue(stack: Stack, admin: str, principal: str, role: str) -> str:
    done = httpx.post(
        stack.url + "/v1/tokens",
        json={"principal": principal, "role": role},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert done.status_code == 201, done.text
    return str(done.json()["token"])


def test_no_token_or_a_bad_one_is_401(stack: Stack) -> None:
    assert "no token" in refused(get_metrics(stack, None), 401, "unauthorized")
    refused(get_metrics(stack, "tp_" + "x" * 43), 401, "unauthorized")


def test_a_tenants_admin_is_403(stack: Stack) -> None:
    detail = refused(get_metrics(stack, stack.tenant()), 403, "forbidden")
    assert "not an operator" in detail


def test_an_operator_tenants_other_roles_are_403(stack: Stack) -> None:
    admin = operator_admin(stack)
    for role in ("auditor", "submitter", "approver"):
        token = issue(stack, admin, f"metrics-{role}", role)
        assert f"a {role}'s" in refused(get_metrics(stack, token), 403, "forbidden")


def test_an_operator_tenants_admin_reads_them(stack: Stack) -> None:
    response = get_metrics(stack, operator_admin(stack))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert "toolplane_outbox_backlog" in response.text
    assert "/metrics" not in httpx.get(stack.url + "/openapi.json", timeout=30).text


def test_a_worker_serves_no_metrics_unless_asked(stack: Stack) -> None:
    """By default no process of any worker listens on a socket, and none is told to."""
    for tool in stack.workers:
        main = psutil.Process(stack.worker_pid(tool))
        assert "TOOLPLANE_WORKER_METRICS_BIND" not in main.environ()
        for process in [main, *main.children(recursive=True)]:
            listening = [
                c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
            ]
            assert listening == [], (tool, process.pid, listening)
