"""The egress capability: fetches a worker makes for a tool, outside its sandbox.

A tool gets no network. If it declares hosts (``ToolSpec.egress``, entries
``host:port``), it may ask for ``ctx.fetch(url)``; the request crosses to the
worker, which checks the URL against the declared hosts, fetches it with a
timeout and a size cap (no proxies, no redirects), and answers. Every fetch,
allowed or refused, is listed in the tool's result, so the receipt covers it.

Addresses: the host is resolved once, here; every address it resolves to must be
public (``is_global``, not multicast, not a cloud metadata address), unless policy
names the ``host:port`` in ``private`` (``private_egress`` of constraints.json,
signed into the envelope). The connection goes to the address that was checked,
with the name in the Host header and TLS SNI, so the name cannot resolve elsewhere
between the check and the connect (DNS rebinding).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_FETCH_BYTES = 1_000_000
FETCH_TIMEOUT_S = 5.0
METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)

Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["FetchRequest", "address_problem", "fetch", "host_port", "resolve", "serve"]


@dataclass(frozen=True)
class FetchRequest:
    url: str
    max_bytes: int = MAX_FETCH_BYTES


def host_port(url: str) -> str | None:
    """``host:port`` of an http(s) URL, or None if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return f"{parts.hostname}:{port}"


def resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (TCP), in the resolver's order."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def address_problem(address: str) -> str | None:
    """Why a fetch may not connect to ``address`` unless policy names the host, or None."""
    try:
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    problem = _problem(ip)
    if problem is None and (inner := _embedded(ip)) is not None:
        problem = _problem(inner)  # NAT64, 6to4 and IPv4-compatible addresses carry one
    return problem


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: 64:ff9b::7f00:1 is 127.0.0.1
COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible: ::127.0.0.1


def _embedded(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64 or ip in COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _problem(ip: IPAddress) -> str | None:
    for kind, hit in (
        ("cloud metadata", ip in METADATA),
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("not global", not ip.is_global),
    ):
        if hit:
            return kind
    return None


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to one checked address; the Host header carries the name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to one checked address; the certificate is checked against the name (SNI)."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def _get(url: str, address: str, cap: int) -> tuple[int, bytes]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = kind(str(parts.hostname), port, address=address, timeout=FETCH_TIMEOUT_S)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", target, headers={"Accept-Encoding": "identity", "Connection": "close"})
        response = conn.getresponse()  # a 3xx is the tool's to see: nothing follows it
        return response.status, response.read(cap + 1)
    finally:
        conn.close()


def _refused(record: dict[str, Any], code: str, error: str) -> tuple[dict, dict]:
    record["error"] = error
    return {"ok": False, "code": code, "message": error}, record


def fetch(
    request: FetchRequest,
    *,
    allowed: tuple[str, ...],
    private: tuple[str, ...] = (),
    resolver: Resolver = resolve,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Carry out one fetch; returns (the answer for the tool, the record for the result)."""
    target = host_port(request.url)
    record: dict[str, Any] = {"url": request.url[:2000], "allowed": False}
    if target is None:
        return _refused(record, "invalid_argument", "not an http(s) URL")
    if target not in allowed:
        return _refused(record, "policy_denied", f"{target} is not in the tool's egress allowlist")
    host, port = target.rsplit(":", 1)
    try:
        addresses = resolver(host.strip("[]"), int(port))
    except (OSError, UnicodeError, ValueError) as e:
        return _refused(record, "tool_error", f"{host} does not resolve: {e}")
    if not addresses:
        return _refused(record, "tool_error", f"{host} does not resolve")
    record["address"] = addresses[0]
    if target not in private:
        for address in addresses:
            kind = address_problem(address)
            if kind is not None:
                return _refused(
                    record,
                    "policy_denied",
                    f"{host} resolves to {address} ({kind}); policy names no such address "
                    f"for {target} (private_egress)",
                )
    record["allowed"] = True
    cap = max(1, min(request.max_bytes, MAX_FETCH_BYTES))
    try:
        status, body = _get(request.url, addresses[0], cap)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return _refused(record, "tool_error", f"fetch failed: {e}")
    if len(body) > cap:
        record["status"] = status
        return _refused(record, "too_large", f"response beyond {cap} bytes")
    record.update(status=status, bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    answer = {"ok": True, "status": status, "body": base64.b64encode(body).decode("ascii")}
    return answer, record


def serve(
    request: Any, *, allowed: tuple[str, ...], private: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Answer a fetch request that came from inside a sandbox (so: untrusted shape)."""
    url = request.get("url") if isinstance(request, dict) else None
    max_bytes = request.get("max_bytes", MAX_FETCH_BYTES) if isinstance(request, dict) else None
    if (
        not isinstance(url, str)
        or not 0 < len(url) <= 2000
        or isinstance(max_bytes, bool)
        or not isinstance(max_bytes, int)
        or not 0 < max_bytes <= MAX_FETCH_BYTES
        or host_port(url) is None
    ):
        record = {"url": str(url)[:2000], "allowed": False, "error": "malformed fetch request"}
        return {"ok": False, "code": "invalid_argument", "message": record["error"]}, record
    return fetch(FetchRequest(url, max_bytes), allowed=allowed, private=private)
