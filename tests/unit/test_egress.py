"""The egress gate takes untrusted requests from inside the sandbox."""

from __future__ import annotations

import pytest

from sandbox_tasks.egress import serve


@pytest.mark.parametrize(
    "request_",
    [
        {"url": "http://a:80/", "max_bytes": "x"},
        {"url": ["http://a:80/"]},
        {"url": "http://a:80/", "max_bytes": 10**30},
        {},
        {"url": "http://[::1"},
    ],
)
def test_malformed_requests_are_refused_not_raised(request_: dict) -> None:
    answer, record = serve(request_, allowed=("a:80",))
    assert answer["ok"] is False and answer["code"] == "invalid_argument"
    assert record["allowed"] is False


def test_hosts_outside_the_allowlist_are_refused_before_any_connection() -> None:
    answer, record = serve({"url": "http://127.0.0.1:6379/"}, allowed=("a:80",))
    assert (answer["code"], record["allowed"]) == ("policy_denied", False)
