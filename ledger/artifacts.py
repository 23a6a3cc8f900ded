"""Artifacts: large results kept outside the database, content-addressed by SHA-256.

An artifact is the RFC 8785 canonical JSON of a tool's result, exactly the bytes whose
SHA-256 is the result's ``result_sha256``, which the tool's receipt signs. The ledger
keeps its metadata (:class:`ArtifactRef`: hash, size, media type, tool, run, node);
the bytes live in an :class:`ArtifactStore`. Whoever reads an artifact checks its
bytes against the hash first (:func:`load_result`), so a changed or missing artifact is
named, never served.

``DirectoryArtifactStore`` keeps ``<root>/sha256/<2 hex>/<62 hex>``: the path is made
only from a validated lower-case hex digest (no traversal), each file is written to a
temporary name (``O_EXCL``), synced, made read-only for its owner (``0400``, in
``0700`` folders: no other user of the host reads a tenant's result) and renamed into
place, and read with ``O_NOFOLLOW`` as a regular file of at most the expected size.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ledger.errors import LedgerError
from toolplane.canonical import parse_json_strict
from toolplane.errors import CanonicalJSONError

__all__ = [
    "MEDIA_TYPE",
    "ArtifactProblem",
    "ArtifactRef",
    "ArtifactStore",
    "DirectoryArtifactStore",
    "MemoryArtifactStore",
    "checked_bytes",
    "load_result",
    "message_with_artifact",
]

MEDIA_TYPE = "application/json"  # RFC 8785 canonical JSON
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactProblem(LedgerError):
    """An artifact that cannot be served: missing, or its bytes are not its hash's."""

    def __init__(self, sha256: str, problem: str, *, where: str = "") -> None:
        super().__init__(f"artifact sha256:{sha256}{f' ({where})' if where else ''}: {problem}")
        self.sha256, self.problem, self.where = sha256, problem, where


def _checked_hex(sha256: object) -> str:
    if not isinstance(sha256, str) or not HEX64.match(sha256):
        raise ArtifactProblem(str(sha256)[:80], "not a SHA-256 hex digest (64 of 0-9a-f)")
    return sha256


@dataclass(frozen=True)
class ArtifactRef:
    """What the ledger keeps of an artifact (the ``artifact`` of a node and of its event)."""

    sha256: str
    size: int
    media_type: str
    tool: str
    run_id: str
    node_id: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "size": self.size,
            "media_type": self.media_type,
            "tool": self.tool,
            "run_id": self.run_id,
            "node_id": self.node_id,
        }

    @classmethod
    def of(cls, value: Any) -> ArtifactRef:
        """From its dict in the ledger; an ArtifactProblem when it is not one."""
        if not isinstance(value, dict):
            raise ArtifactProblem("?", "artifact metadata is not an object")
        try:
            ref = cls(**{k: value[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as e:
            raise ArtifactProblem(str(value.get("sha256"))[:80], f"metadata: {e}") from e
        _checked_hex(ref.sha256)
        if type(ref.size) is not int or ref.size < 0:
            raise ArtifactProblem(ref.sha256, "metadata: size is not a non-negative integer")
        return ref

    @property
    def where(self) -> str:
        return f"run {self.run_id} node {self.node_id}"


class ArtifactStore(Protocol):
    """Content-addressed bytes: ``put`` returns their SHA-256, ``get`` raises
    ArtifactProblem when there are none under it (it does not check them:
    :func:`load_result` does)."""

    def put(self, data: bytes) -> str: ...

    def get(self, sha256: str, *, limit: int) -> bytes: ...


class DirectoryArtifactStore:
    """Files under ``root``; written by the control only."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        digest = _checked_hex(sha256)
        return self.root / "sha256" / digest[:2] / digest[2:]

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        final = self.path_for(digest)
        try:
            if self.get(digest, limit=len(data)) == data:
                return digest  # already there, intact
        except ArtifactProblem:
            pass  # absent (or changed: replaced by the good bytes below)
        # Only the control's user may list or read a tenant's result: 0700 folders, 0400 files.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (self.root / "sha256", final.parent):
            folder.mkdir(mode=0o700, exist_ok=True)
        temporary = final.parent / f".{digest[2:]}.{secrets.token_hex(8)}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o400)
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return digest

    def get(self, sha256: str, *, limit: int) -> bytes:
        path = self.path_for(sha256)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ArtifactProblem(sha256, "missing from the artifact store") from None
        except OSError as e:  # a symlink (ELOOP), or unreadable
            raise ArtifactProblem(sha256, f"cannot be read: {e.strerror}") from None
        with os.fdopen(fd, "rb") as file:
            found = os.fstat(file.fileno())
            if not stat.S_ISREG(found.st_mode):
                raise ArtifactProblem(sha256, "is not a regular file in the artifact store")
            # Never more than the file holds: a size recorded in a (rewritten) row must
            # not become the allocation of a read (read(n) allocates n bytes first).
            return file.read(min(limit, found.st_size) + 1)


class MemoryArtifactStore:
    """Artifacts held in memory: those an offline bundle carries."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def get(self, sha256: str, *, limit: int) -> bytes:
        found = self.blobs.get(_checked_hex(sha256))
        if found is None:
            raise ArtifactProblem(sha256, "missing (not in the bundle)")
        return found[: limit + 1]


def checked_bytes(store: ArtifactStore | None, ref: ArtifactRef) -> bytes:
    """An artifact's bytes, checked against its hash and size; an ArtifactProblem
    (naming the hash, run and node) when they are missing or do not match."""
    if store is None:
        raise ArtifactProblem(ref.sha256, "no artifact store is configured", where=ref.where)
    try:
        data = store.get(ref.sha256, limit=ref.size)
    except ArtifactProblem as e:
        raise ArtifactProblem(ref.sha256, e.problem, where=ref.where) from None
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise ArtifactProblem(
            ref.sha256, "bytes in the store do not match the hash (changed)", where=ref.where
        )
    return data


def load_result(store: ArtifactStore | None, ref: ArtifactRef) -> dict[str, Any]:
    """The result an artifact holds (:func:`checked_bytes`), parsed."""
    data = checked_bytes(store, ref)
    try:
        value = parse_json_strict(data)
    except (CanonicalJSONError, ValueError) as e:
        raise ArtifactProblem(ref.sha256, f"not a JSON result: {e}", where=ref.where) from None
    if not isinstance(value, dict):
        raise ArtifactProblem(ref.sha256, "not a JSON object", where=ref.where)
    return value


def message_with_artifact(payload: dict[str, Any], store: ArtifactStore | None) -> Any:
    """The result message an evidence event carries, whole: when the event names an
    ``artifact``, its checked bytes are put back as ``result.result`` (the receipt signs
    the result with them). An ArtifactProblem when they cannot be."""
    message = payload.get("message")
    if "artifact" not in payload:
        return message
    ref = ArtifactRef.of(payload["artifact"])
    inner = message.get("result") if isinstance(message, dict) else None
    if not isinstance(inner, dict) or inner.get("result_sha256") != ref.sha256:
        raise ArtifactProblem(
            ref.sha256, "not the result_sha256 of the event's receipt", where=ref.where
        )
    if "result" in inner:
        raise ArtifactProblem(
            ref.sha256, "the event carries the result inline as well", where=ref.where
        )
    return {**message, "result": {**inner, "result": load_result(store, ref)}}
