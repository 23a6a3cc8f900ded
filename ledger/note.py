"""C2SP signed notes with Ed25519 keys (https://c2sp.org/signed-note) (pure).

A note is UTF-8 text ending in a newline, a blank line, then one line per signature:
``— <key name> <base64(key id (4 bytes) || signature (64 bytes))>``. The key id is the
first 4 bytes of ``SHA-256(key name || 0x0A || 0x01 || public key)``. A verifier key
is written ``<name>+<hex key id>+<base64(0x01 || public key)>``; a signer key
``PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || 32-byte seed)>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from ledger.errors import LedgerError

__all__ = [
    "DASH",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "Signature",
    "b64_strict",
    "check_name",
    "generate_signer",
    "open_note",
    "sign_note",
    "split_note",
]

ED25519 = 0x01
DASH = "\u2014"
MAX_NOTE = 1 << 20


class NoteError(LedgerError):
    """A note, key or signature that is malformed or does not verify; names which."""


def b64_strict(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise NoteError(f"{what}: not valid base64") from e
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteError(f"{what}: not canonical base64")
    return raw


def check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise NoteError(f"key name {name!r}: must be non-empty, without spaces or '+'")


def key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public).digest()[:4]


@dataclass(frozen=True)
class NoteVerifier:
    name: str
    public: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public)

    @property
    def vkey(self) -> str:
        encoded = base64.b64encode(bytes([ED25519]) + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, vkey: str) -> NoteVerifier:
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError(f"verifier key {vkey!r}: expected name+keyid+key")
        name, hex_id, encoded = parts
        check_name(name)
        raw = b64_strict(encoded, "verifier key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise NoteError("verifier key: not an Ed25519 key (type 0x01, 32 bytes)")
        verifier = cls(name, raw[1:])
        if hex_id != verifier.key_id.hex():
            raise NoteError(f"verifier key of {name}: key id {hex_id} does not match the key")
        return verifier

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, text)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class NoteSigner:
    name: str
    seed: bytes

    @property
    def verifier(self) -> NoteVerifier:
        key = Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        return NoteVerifier(self.name, key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    @property
    def skey(self) -> str:
        encoded = base64.b64encode(bytes([ED25519]) + self.seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, skey: str) -> NoteSigner:
        parts = skey.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise NoteError("signer key: expected PRIVATE+KEY+name+keyid+key")
        _, _, name, hex_id, encoded = parts
        check_name(name)
        raw = b64_strict(encoded, "signer key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise NoteError("signer key: not an Ed25519 key (type 0x01, 32 bytes)")
        signer = cls(name, raw[1:])
        if hex_id != signer.verifier.key_id.hex():
            raise NoteError(f"signer key of {name}: key id {hex_id} does not match the key")
        return signer

    def signature_line(self, text: bytes) -> str:
        sig = Ed25519PrivateKey.from_private_bytes(self.seed).sign(text)
        blob = base64.b64encode(self.verifier.key_id + sig).decode()
        return f"{DASH} {self.name} {blob}\n"


def generate_signer(name: str) -> NoteSigner:
    check_name(name)
    key = Ed25519PrivateKey.generate()
    return NoteSigner(name, key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    signature: bytes
    line: str


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text: must end with a newline")
    if "\n\n" in text:
        raise NoteError("note text: must not contain a blank line")
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or c == "\x7f"]
    if bad:
        raise NoteError("note text: holds a control character")


def sign_note(text: str, signers: list[NoteSigner]) -> str:
    _check_text(text)
    data = text.encode("utf-8")
    return text + "\n" + "".join(s.signature_line(data) for s in signers)


def split_note(note: bytes) -> tuple[str, list[Signature]]:
    """The text and the signature lines of a note, checked for form only."""
    if len(note) > MAX_NOTE:
        raise NoteError(f"note: larger than {MAX_NOTE} bytes")
    try:
        whole = note.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NoteError("note: not UTF-8") from e
    cut = whole.rfind("\n\n")
    if cut < 0:
        raise NoteError("note: no blank line before the signatures")
    text, block = whole[: cut + 1], whole[cut + 2 :]
    _check_text(text)
    if not block.endswith("\n"):
        raise NoteError("note signatures: must end with a newline")
    signatures = []
    for i, line in enumerate(block[:-1].split("\n")):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH:
            raise NoteError(f"note signature {i}: expected '— name signature'")
        check_name(parts[1])
        raw = b64_strict(parts[2], f"note signature {i} ({parts[1]})")
        if len(raw) < 5:
            raise NoteError(f"note signature {i} ({parts[1]}): too short")
        signatures.append(Signature(parts[1], raw[:4], raw[4:], line + "\n"))
    if not signatures:
        raise NoteError("note: no signatures")
    return text, signatures


def open_note(note: bytes, verifiers: list[NoteVerifier]) -> tuple[str, list[Signature]]:
    """The text and the signatures made by ``verifiers``; raises NoteError unless at least
    one of them signed it, or if a signature by one of their names and ids is bad."""
    text, signatures = split_note(note)
    data = text.encode("utf-8")
    known = {(v.name, v.key_id): v for v in verifiers}
    good = []
    for sig in signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            continue
        if not verifier.verify(data, sig.signature):
            raise NoteError(f"note signature by {sig.name} ({sig.key_id.hex()}) does not verify")
        good.append(sig)
    if not good:
        names = ", ".join(f"{s.name} ({s.key_id.hex()})" for s in signatures)
        raise NoteError(f"note: signed by no trusted key (signatures: {names})")
    return text, good
