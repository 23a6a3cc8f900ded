"""The frame protocol between a worker, its sandbox runner and a tool's child.

A frame is a 4-byte big-endian length, then RFC 8785 JSON. Each transport
(a pipe with a deadline, a blocking stream, a socket) reads its own bytes;
encoding, the size limit and decoding live here once.
"""

from __future__ import annotations

import struct
from typing import Any

from toolplane.canonical import canonical_json, parse_json_strict

HEADER = 4
MAX_FRAME = 64 * 1024 * 1024

__all__ = ["HEADER", "MAX_FRAME", "FrameError", "body_size", "decode", "encode"]


class FrameError(ValueError):
    """A frame that is too large or not a frame."""


def encode(value: Any) -> bytes:
    body = canonical_json(value)
    return struct.pack(">I", len(body)) + body


def body_size(header: bytes) -> int:
    if len(header) != HEADER:
        raise FrameError("short frame header")
    (size,) = struct.unpack(">I", header)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes, limit {MAX_FRAME}")
    return int(size)


def decode(body: bytes) -> Any:
    return parse_json_strict(body)
