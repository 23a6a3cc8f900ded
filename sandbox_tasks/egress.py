"""The egress capability: fetches a worker makes for a tool, outside its sandbox.

A tool gets no network. If it declares hosts (``ToolSpec.egress``, entries
``host:port``), it may ask for ``ctx.fetch(url)``; the request crosses to the
worker, which checks the URL against the declared hosts, fetches it with a
timeout and a size cap (no proxies, no redirects), and answers. Every fetch,
allowed or refused, is listed in the tool's result, so the receipt covers it.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_FETCH_BYTES = 1_000_000
FETCH_TIMEOUT_S = 5.0

__all__ = ["FetchRequest", "fetch", "host_port", "serve"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect could leave the allowlist: the tool sees the 3xx


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


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


def fetch(
    request: FetchRequest, *, allowed: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Carry out one fetch; returns (the answer for the tool, the record for the result)."""
    target = host_port(request.url)
    record: dict[str, Any] = {"url": request.url[:2000], "allowed": False}
    if target is None:
        record["error"] = "not an http(s) URL"
        return {"ok": False, "code": "invalid_argument", "message": record["error"]}, record
    if target not in allowed:
        record["error"] = f"{target} is not in the tool's egress allowlist"
        return {"ok": False, "code": "policy_denied", "message": record["error"]}, record
    record["allowed"] = True
    cap = max(1, min(request.max_bytes, MAX_FETCH_BYTES))
    try:
        with _OPENER.open(request.url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310
            status = response.status
            body = response.read(cap + 1)
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read(cap + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        record["error"] = f"fetch failed: {e}"
        return {"ok": False, "code": "tool_error", "message": record["error"]}, record
    if len(body) > cap:
        record.update(status=status, error=f"response beyond {cap} bytes")
        return {"ok": False, "code": "too_large", "message": record["error"]}, record
    record.update(status=status, bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    answer = {"ok": True, "status": status, "body": base64.b64encode(body).decode("ascii")}
    return answer, record


def serve(request: Any, *, allowed: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
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
    return fetch(FetchRequest(url, max_bytes), allowed=allowed)
