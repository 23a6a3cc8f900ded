"""Signers and a verifying key ring, with key ids and validity windows.

A key belongs to an owner: ``control`` (signs job envelopes) or ``tool.<name>``
(signs that tool's receipts, refusals and manifests). Ed25519 is the default;
HMAC-SHA256 is supported where both sides share a secret.

A key is judged by when the verifier *receives* the message (a worker when it
takes a job, the control when it ingests a result or a manifest, the ledger's
verification by when the control accepted the evidence), never by a time the
message claims: whoever holds a retired key cannot backdate a message into its
old window. A key's life:

    active    from not_before (less the clock skew) on, until it is retired
    retired   from not_after (rotation): it signs nothing new, and verifies what
              arrives within RETIRED_KEY_GRACE after (jobs that were in flight)
    revoked   from revoked_at: verifies nothing received from then on, no grace

so rotating a key never breaks work in flight, and revoking one cuts it off at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from toolplane.errors import SignatureError, UnknownKeyError
from toolplane.lifetimes import CLOCK_SKEW_S, RETIRED_KEY_GRACE

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


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True)
class PublicKey:
    """What a verifier knows of a key: for HMAC, the shared secret itself."""

    key_id: str
    owner: str
    algorithm: Algorithm
    material: bytes
    not_before: datetime
    not_after: datetime | None = None  # retired: signs nothing from then on
    revoked_at: datetime | None = None  # revoked: verifies nothing received from then on

    def refusal_at(self, received: datetime) -> str | None:
        """Why this key verifies nothing received at ``received``; None when it does."""
        when = f"(received {received.isoformat()})"
        if self.revoked_at is not None and received >= self.revoked_at:
            return (
                f"key {self.key_id!r} was revoked at {self.revoked_at.isoformat()} and verifies "
                f"nothing received from then on {when}"
            )
        if received < self.not_before - timedelta(seconds=CLOCK_SKEW_S):
            return f"key {self.key_id!r} is not valid before {self.not_before.isoformat()} {when}"
        if self.not_after is not None and received >= self.not_after + RETIRED_KEY_GRACE:
            return (
                f"key {self.key_id!r} was retired at {self.not_after.isoformat()} and its grace "
                f"ended at {(self.not_after + RETIRED_KEY_GRACE).isoformat()} {when}"
            )
        return None

    def accepts_at(self, received: datetime) -> bool:
        return self.refusal_at(received) is None

    def merged(self, *, not_after: datetime | None, revoked_at: datetime | None) -> PublicKey:
        """This key with the earliest retirement and revocation known to either source."""
        return replace(
            self,
            not_after=_earliest(self.not_after, not_after),
            revoked_at=_earliest(self.revoked_at, revoked_at),
        )


class KeyRing:
    """Verifies signatures against a set of trusted keys."""

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys: dict[str, PublicKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: PublicKey) -> None:
        self._keys[key.key_id] = key

    def with_key(self, key: PublicKey) -> KeyRing:
        """A copy of this ring with ``key`` added or replaced (this ring is left as it is)."""
        ring = KeyRing(self._keys.values())
        ring.add(key)
        return ring

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
        received: datetime,
    ) -> PublicKey:
        """Return the key that verified ``signature`` or raise SignatureError.

        ``received`` is when the verifier received the message (never a time the message
        claims): the key must accept messages received then (see the module's docstring).
        """
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
        refusal = key.refusal_at(received)
        if refusal is not None:
            raise UnknownKeyError(refusal, key_id=key_id)
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
