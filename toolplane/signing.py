"""Signers and a verifying key ring, with key ids and validity windows.

A key belongs to an owner: ``control`` (signs job envelopes) or ``tool.<name>``
(signs that tool's receipts, refusals and manifests). Ed25519 is the default;
HMAC-SHA256 is supported where both sides share a secret. A signature is checked
against the key that was valid at the moment of signing, so rotating a key never
breaks the verification of what the old key signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from toolplane.errors import SignatureError, UnknownKeyError

Algorithm = Literal["ed25519", "hmac-sha256"]
ALGORITHMS: tuple[Algorithm, ...] = ("ed25519", "hmac-sha256")

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Ed25519Signer",
    "HmacSigner",
    "KeyRing",
    "PublicKey",
    "Signer",
    "b64decode",
    "b64encode",
    "key_id_for",
]


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise SignatureError(f"not valid base64: {e}") from e
    if base64.b64encode(raw).decode("ascii") != text:
        raise SignatureError("not canonical base64")
    return raw


def key_id_for(owner: str, material: bytes) -> str:
    """A stable key id: the owner and a fingerprint of the (public) key material."""
    return f"{owner}:{hashlib.sha256(material).hexdigest()[:16]}"


class Signer(Protocol):
    key_id: str
    owner: str
    algorithm: Algorithm

    def sign(self, data: bytes) -> str: ...


@dataclass(frozen=True)
class Ed25519Signer:
    private_key: Ed25519PrivateKey
    key_id: str
    owner: str
    algorithm: Algorithm = "ed25519"

    def sign(self, data: bytes) -> str:
        return b64encode(self.private_key.sign(data))


@dataclass(frozen=True)
class HmacSigner:
    secret: bytes
    key_id: str
    owner: str
    algorithm: Algorithm = "hmac-sha256"

    def sign(self, data: bytes) -> str:
        return b64encode(hmac.new(self.secret, data, hashlib.sha256).digest())


@dataclass(frozen=True)
class PublicKey:
    """What a verifier knows of a key: for HMAC, the shared secret itself."""

    key_id: str
    owner: str
    algorithm: Algorithm
    material: bytes
    not_before: datetime
    not_after: datetime | None = None

    def valid_at(self, at: datetime) -> bool:
        return self.not_before <= at and (self.not_after is None or at < self.not_after)


class KeyRing:
    """Verifies signatures against a set of trusted keys."""

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys: dict[str, PublicKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: PublicKey) -> None:
        self._keys[key.key_id] = key

    def get(self, key_id: str) -> PublicKey | None:
        return self._keys.get(key_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def verify(
        self,
        *,
        key_id: str,
        algorithm: str,
        data: bytes,
        signature: str,
        owner: str,
        at: datetime,
    ) -> PublicKey:
        """Return the key that verified ``signature`` or raise SignatureError."""
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownKeyError(f"unknown key id {key_id!r}", key_id=key_id)
        if key.owner != owner:
            raise UnknownKeyError(
                f"key {key_id!r} belongs to {key.owner!r}, not {owner!r}", key_id=key_id
            )
        if key.algorithm != algorithm:
            raise SignatureError(
                f"key {key_id!r} is {key.algorithm}, signature claims {algorithm}", key_id=key_id
            )
        if not key.valid_at(at):
            raise UnknownKeyError(
                f"key {key_id!r} was not valid at {at.isoformat()}", key_id=key_id
            )
        raw = b64decode(signature)
        if key.algorithm == "ed25519":
            try:
                Ed25519PublicKey.from_public_bytes(key.material).verify(raw, data)
            except (InvalidSignature, ValueError) as e:
                raise SignatureError("signature does not verify", key_id=key_id) from e
        else:
            expected = hmac.new(key.material, data, hashlib.sha256).digest()
            if not hmac.compare_digest(expected, raw):
                raise SignatureError("signature does not verify", key_id=key_id)
        return key
