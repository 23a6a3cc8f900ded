"""Witness cosignatures: C2SP tlog-cosignature/v1 over a checkpoint (pure).

A witness signs ``cosignature/v1\\ntime <unix seconds>\\n`` followed by the checkpoint's
text, with Ed25519. Its signature line is ``— <witness name> <base64(key id (4) ||
timestamp (8, big-endian) || signature (64))>``; its key id is the first 4 bytes of
``SHA-256(name || 0x0A || 0x04 || public key)`` and its verifier key is written
``<name>+<hex key id>+<base64(0x04 || public key)>``.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ledger.note import (
    DASH,
    NoteError,
    NoteSigner,
    Signature,
    b64_strict,
    check_name,
    split_note,
)

__all__ = ["CosignatureVerifier", "WitnessSigner", "cosignature_problem", "cosigned_message"]

COSIGNATURE = 0x04


def cosigned_message(text: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode("utf-8")


def _key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([COSIGNATURE]) + public).digest()[:4]


@dataclass(frozen=True)
class CosignatureVerifier:
    name: str
    public: bytes

    @property
    def key_id(self) -> bytes:
        return _key_id(self.name, self.public)

    @property
    def vkey(self) -> str:
        encoded = base64.b64encode(bytes([COSIGNATURE]) + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, vkey: str) -> CosignatureVerifier:
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError(f"witness key {vkey!r}: expected name+keyid+key")
        name, hex_id, encoded = parts
        check_name(name)
        raw = b64_strict(encoded, "witness key")
        if len(raw) != 33 or raw[0] != COSIGNATURE:
            raise NoteError("witness key: not a cosignature/v1 key (type 0x04, 32 bytes)")
        verifier = cls(name, raw[1:])
        if hex_id != verifier.key_id.hex():
            raise NoteError(f"witness key of {name}: key id {hex_id} does not match the key")
        return verifier

    def verify(self, text: str, signature: Signature) -> int:
        """The cosignature's timestamp; NoteError unless it is this witness's over ``text``."""
        if signature.name != self.name or signature.key_id != self.key_id:
            raise NoteError(f"cosignature by {signature.name}: not this witness's key")
        if len(signature.signature) != 72:
            raise NoteError(f"cosignature by {signature.name}: not 8 + 64 bytes")
        (timestamp,) = struct.unpack(">Q", signature.signature[:8])
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(
                signature.signature[8:], cosigned_message(text, timestamp)
            )
        except (InvalidSignature, ValueError) as e:
            raise NoteError(f"cosignature by {signature.name} does not verify") from e
        return int(timestamp)


@dataclass(frozen=True)
class WitnessSigner:
    """A witness's key: a C2SP signer key file's seed, used for cosignature/v1."""

    name: str
    seed: bytes

    @classmethod
    def of(cls, signer: NoteSigner) -> WitnessSigner:
        return cls(signer.name, signer.seed)

    @property
    def verifier(self) -> CosignatureVerifier:
        key = Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        return CosignatureVerifier(self.name, key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def cosign(self, text: str, timestamp: int) -> str:
        sig = Ed25519PrivateKey.from_private_bytes(self.seed).sign(
            cosigned_message(text, timestamp)
        )
        blob = self.verifier.key_id + struct.pack(">Q", timestamp) + sig
        return f"{DASH} {self.name} {base64.b64encode(blob).decode()}\n"


def cosignature_problem(note: bytes, witness: CosignatureVerifier) -> str | None:
    """None if ``witness`` cosigned the checkpoint of ``note``, else why not."""
    text, signatures = split_note(note)
    mine = [s for s in signatures if s.name == witness.name and s.key_id == witness.key_id]
    if not mine:
        return f"not cosigned by witness {witness.name}"
    try:
        witness.verify(text, mine[0])
    except NoteError as e:
        return str(e)
    return None
