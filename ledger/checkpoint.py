"""C2SP tlog-checkpoint bodies (https://c2sp.org/tlog-checkpoint) for evidence chains (pure).

A checkpoint's text is three lines: the origin, the tree size in decimal, and the
base64 of the RFC 9162 root hash; then any extension lines (we write none). It is
signed as a C2SP signed note (ledger/note.py). The origin names the deployment and
the chain: ``<deployment>/tenant/<tenant id>`` for a tenant's chain,
``<deployment>/system`` for the system chain.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from ledger.note import NoteError

__all__ = ["Checkpoint", "chain_of_origin", "check_deployment", "origin_for"]

DEPLOYMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
SIZE = re.compile(r"^(0|[1-9][0-9]{0,18})$")


def check_deployment(name: str) -> str:
    if not DEPLOYMENT.match(name) or name.endswith("/") or "//" in name:
        raise NoteError(
            f"deployment name {name!r}: letters, digits, '.', '_', '-' and '/' only, "
            "at most 200, no empty path segment"
        )
    return name


def origin_for(deployment: str, chain_id: str) -> str:
    """``tenant:<id>`` -> ``<deployment>/tenant/<id>``; ``system`` -> ``<deployment>/system``."""
    return f"{check_deployment(deployment)}/{chain_id.replace(':', '/', 1)}"


def chain_of_origin(deployment: str, origin: str) -> str | None:
    prefix = check_deployment(deployment) + "/"
    if not origin.startswith(prefix):
        return None
    rest = origin[len(prefix) :]
    if rest == "system":
        return "system"
    if rest.startswith("tenant/") and "/" not in rest[7:] and rest[7:]:
        return "tenant:" + rest[7:]
    return None


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [
            self.origin,
            str(self.size),
            base64.b64encode(self.root).decode(),
            *self.extensions,
        ]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        if not text.endswith("\n"):
            raise NoteError("checkpoint: must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("checkpoint: expected origin, size and root lines")
        origin, size, root = lines[:3]
        if not origin or any(c.isspace() for c in origin):
            raise NoteError("checkpoint origin: empty or holds a space")
        if not SIZE.match(size):
            raise NoteError(f"checkpoint size {size!r}: not a decimal without leading zeros")
        try:
            raw = base64.b64decode(root.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as e:
            raise NoteError("checkpoint root: not valid base64") from e
        if len(raw) != 32 or base64.b64encode(raw).decode() != root:
            raise NoteError("checkpoint root: not the canonical base64 of 32 bytes")
        if any(not line for line in lines[3:]):
            raise NoteError("checkpoint: empty extension line")
        return cls(origin, int(size), raw, tuple(lines[3:]))
