"""The egress gate takes untrusted requests from inside the sandbox."""

from __future__ import annotations

import pytest

from sandbox_tasks.egress import FetchRequest, address_problem, fetch, serve


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


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.3.2.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address judged, never bound
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "not global"),
        ("not-an-ip", "not an IP address"),
    ],
)
def test_non_public_addresses_are_named(address: str, kind: str) -> None:
    assert address_problem(address) == kind


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(address) is None


def test_a_name_resolving_to_a_private_address_is_refused_without_connecting() -> None:
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["93.184.216.34", "169.254.169.254"]  # one bad address is enough to refuse

    answer, record = fetch(
        FetchRequest("http://api.example.com/x"), allowed=("api.example.com:80",), resolver=resolver
    )
    assert (answer["code"], record["allowed"]) == ("policy_denied", False)
    assert (
        "169.254.169.254 (cloud metadata)" in record["error"]
        and "private_egress" in answer["message"]
    )
    assert asked == [("api.example.com", 80)]
    # naming another host, or the host without it being allowed, changes nothing
    answer, _ = fetch(
        FetchRequest("http://api.example.com/x"),
        allowed=("api.example.com:80",),
        private=("other:80",),
        resolver=resolver,
    )
    assert answer["code"] == "policy_denied"


def test_an_unresolvable_name_is_a_tool_error() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    answer, record = fetch(
        FetchRequest("http://nowhere.invalid/"), allowed=("nowhere.invalid:80",), resolver=resolver
    )
    assert answer["code"] == "tool_error" and "does not resolve" in record["error"]


def test_private_egress_is_granted_by_policy_never_declared() -> None:
    from dataclasses import replace

    from sandbox_tasks.errors import RegistryError
    from sandbox_tasks.registry import constrained, load_tools
    from sandbox_tasks.tools import lint_python

    spec = replace(lint_python.TOOL, egress=("a:80", "b:80"))
    granted = constrained(spec, None, None, ["b:80", "c:80"])
    assert (granted.egress, granted.private_egress) == (("a:80", "b:80"), ("b:80",))
    narrowed = constrained(spec, None, ["a:80"], ["b:80"])
    assert (narrowed.egress, narrowed.private_egress) == (("a:80",), ())
    assert constrained(spec, None, None, None) is spec
    import sys
    import types

    module = types.ModuleType("tp_self_granting")
    module.TOOL = replace(spec, private_egress=("a:80",))  # type: ignore[attr-defined]
    sys.modules["tp_self_granting"] = module
    try:
        with pytest.raises(RegistryError, match="only policy grants it"):
            load_tools(["tp_self_granting"])
    finally:
        del sys.modules["tp_self_granting"]
