"""Egress: no raw network, only fetches the worker makes for the tool, to declared
hosts, with a size cap, listed in the signed result. A host that resolves to a
loopback, private, link-local or metadata address is refused unless policy names it
(the stack's constraints.json names 127.0.0.1:<port> of the test server, not
localhost:<port>, which the fetcher also declares)."""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ledger.models import EvidenceEvent
from sandbox_tasks.confine import available, containment
from sandbox_tasks.egress import FetchRequest, fetch
from tests.harness import Stack

pytestmark = pytest.mark.integration


def signed_result(stack: Stack, token: str, run_id: str) -> dict[str, Any]:
    client = stack.client(token)
    with client.plane.sessions() as session:
        payload = session.scalar(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == run_id,
                EvidenceEvent.kind.in_(["ToolCallCompleted", "ToolCallFailed"]),
            )
        )
    return payload["message"]["result"]


@pytest.fixture
def base(http_server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{http_server.server_address[1]}"


def test_a_declared_host_is_fetched_and_the_fetch_is_signed(
    stack: Stack, token: str, base: str
) -> None:
    client = stack.client(token)
    view = client.call("fetcher", {"url": f"{base}/hello"}, wait=True)
    assert view.status == "completed", view
    assert view.nodes[0].result == {"status": 200, "body": "hello from the allowed host"}
    result = signed_result(stack, token, view.run_id)
    assert result["containment"] == containment("bwrap", available())
    [fetch] = result["fetches"]
    assert fetch["url"] == f"{base}/hello" and fetch["allowed"] is True and fetch["status"] == 200
    assert fetch["bytes"] == len("hello from the allowed host")
    assert client.verify_ledger(run_id=view.run_id).ok  # the receipt covers the fetch list


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379/", "http://localhost:5432/", "file:///etc/passwd", "gopher://x"]
)
def test_other_hosts_and_schemes_are_refused_and_recorded(
    stack: Stack, token: str, url: str
) -> None:
    view = stack.client(token).call("fetcher", {"url": url}, wait=True)
    node = view.nodes[0]
    assert node.status == "failed"
    assert node.error["code"] in ("policy_denied", "invalid_argument"), node.error
    [fetch] = signed_result(stack, token, view.run_id)["fetches"]
    assert fetch["allowed"] is False and fetch["url"] == url


def test_a_response_over_the_cap_is_cut_off(stack: Stack, token: str, base: str) -> None:
    view = stack.client(token).call("fetcher", {"url": f"{base}/big", "max_bytes": 1000}, wait=True)
    assert view.nodes[0].error["code"] == "too_large"


def test_redirects_are_not_followed_off_the_allowlist(stack: Stack, token: str, base: str) -> None:
    view = stack.client(token).call("fetcher", {"url": f"{base}/redirect"}, wait=True)
    assert view.status == "completed"
    assert view.nodes[0].result["status"] == 302  # the tool sees the redirect; nothing followed it
    [fetch] = signed_result(stack, token, view.run_id)["fetches"]
    assert fetch["status"] == 302


def test_a_tool_without_egress_gets_no_fetch(stack: Stack, token: str) -> None:
    # the probe declares no egress: its sandbox has no network and no fetch channel
    view = stack.client(token).call("probe", {"action": "connect_redis"}, wait=True)
    assert view.nodes[0].result["outcome"] == "refused"
    assert signed_result(stack, token, view.run_id)["fetches"] == []


def test_policy_can_take_a_declared_host_away(stack: Stack, token: str, base: str) -> None:
    # tests/fixtures/policy/constraints.json: no egress for confidential calls of fetcher
    view = stack.client(token).call(
        "fetcher", {"url": f"{base}/hello"}, classification="confidential", wait=True
    )
    assert view.nodes[0].error["code"] == "policy_denied"
    [fetch] = signed_result(stack, token, view.run_id)["fetches"]
    assert fetch["allowed"] is False


def test_policy_lowers_a_tools_limits(stack: Stack, token: str) -> None:
    client = stack.client(token)
    slow = client.call("sleepy", {"seconds": 3}, classification="confidential", wait=True)
    assert slow.nodes[0].error["code"] == "timeout"  # 1 s by policy instead of the declared 8 s
    with client.plane.sessions() as session:
        from ledger.models import Node

        envelope = session.scalar(select(Node.envelope).where(Node.run_id == slow.run_id))
    assert envelope["envelope"]["limits"]["timeout_s"] == 1
    assert envelope["envelope"]["limits"]["memory_mb"] == 4096  # above the declared 512: ignored
    assert client.call("sleepy", {"seconds": 2}, wait=True).status == "completed"


def test_a_name_resolving_to_loopback_is_refused_when_policy_does_not_name_it(
    stack: Stack, token: str, http_server: ThreadingHTTPServer
) -> None:
    port = http_server.server_address[1]
    client = stack.client(token)
    view = client.call("fetcher", {"url": f"http://localhost:{port}/hello"}, wait=True)
    node = view.nodes[0]
    assert node.status == "failed" and node.error["code"] == "policy_denied", node.error
    assert "loopback" in node.error["message"] and "private_egress" in node.error["message"]
    [record] = signed_result(stack, token, view.run_id)["fetches"]
    assert record["allowed"] is False and "status" not in record  # never connected
    assert record["address"] in ("127.0.0.1", "::1") and "loopback" in record["error"]
    assert client.verify_ledger(run_id=view.run_id).ok  # the refusal is under the receipt


def test_the_policy_that_names_a_private_host_is_signed_into_the_envelope(
    stack: Stack, token: str, base: str
) -> None:
    from ledger.models import Node

    client = stack.client(token)
    view = client.call("fetcher", {"url": f"{base}/hello"}, wait=True)
    with client.plane.sessions() as session:
        envelope = session.scalar(select(Node.envelope).where(Node.run_id == view.run_id))
    assert envelope["envelope"]["private_egress"] == [base.removeprefix("http://")]


def test_the_fetch_connects_to_the_address_it_checked_with_the_name_as_host(
    http_server: ThreadingHTTPServer,
) -> None:
    port = http_server.server_address[1]
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])  # a rebinding resolver
    asked: list[str] = []

    def resolver(host: str, _port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    target = f"rebind.example:{port}"
    answer, record = fetch(
        FetchRequest(f"http://{target}/host"),
        allowed=(target,),
        private=(target,),
        resolver=resolver,
    )
    assert answer["ok"] is True, answer
    assert base64.b64decode(answer["body"]).decode() == target  # the Host header: the name
    assert asked == ["rebind.example"]  # resolved once: what was checked is what was used
    assert record["address"] == "127.0.0.1" and record["status"] == 200
    refused, _ = fetch(
        FetchRequest(f"http://{target}/host"), allowed=(target,), resolver=lambda h, p: ["::1"]
    )
    assert refused["code"] == "policy_denied"  # not named: the same server is not reached


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_to_the_checked_address_sends_the_name_as_sni_and_verifies_it(
    tmp_path: Path,
) -> None:
    cert, key = _self_signed(tmp_path, "pinned.example")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    seen: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: seen.append(name)  # type: ignore[assignment]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_one() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError):
            context.wrap_socket(conn, server_side=True).close()
        conn.close()

    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    target = f"pinned.example:{port}"
    try:
        answer, record = fetch(
            FetchRequest(f"https://{target}/"),
            allowed=(target,),
            private=(target,),
            resolver=lambda host, _port: ["127.0.0.1"],
        )
    finally:
        thread.join(timeout=10)
        listener.close()
    assert seen == ["pinned.example"]  # SNI: the name, though the socket went to 127.0.0.1
    # the certificate is checked (this one is self-signed): no body reaches the tool
    assert answer["ok"] is False and answer["code"] == "tool_error"
    assert "CERTIFICATE_VERIFY_FAILED" in record["error"], record
