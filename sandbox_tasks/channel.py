"""The fetch channel between a tool's forked child and the process that forked it."""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox_tasks import frames
from sandbox_tasks.errors import ToolFailure

__all__ = ["FetchResponse", "Fetcher", "child_fetch", "recv_frame", "send_frame"]

Fetcher = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class FetchResponse:
    status: int
    body: bytes


def send_frame(sock: socket.socket, value: Any) -> None:
    sock.sendall(frames.encode(value))


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> Any | None:
    header = _recv_exact(sock, frames.HEADER)
    if header is None:
        return None
    try:
        size = frames.body_size(header)
    except frames.FrameError:
        return None
    body = _recv_exact(sock, size)
    return None if body is None else frames.decode(body)


def child_fetch(sock: socket.socket) -> Callable[..., FetchResponse]:
    """``ctx.fetch`` as a tool sees it: ask the outside, get bytes or a ToolFailure."""

    def fetch(url: str, *, max_bytes: int = 1_000_000) -> FetchResponse:
        send_frame(sock, {"url": str(url), "max_bytes": int(max_bytes)})
        answer = recv_frame(sock)
        if not isinstance(answer, dict):
            raise ToolFailure("tool_error", "egress channel closed")
        if answer.get("ok") is not True:
            raise ToolFailure(str(answer.get("code", "tool_error")), str(answer.get("message", "")))
        return FetchResponse(status=int(answer["status"]), body=base64.b64decode(answer["body"]))

    return fetch
