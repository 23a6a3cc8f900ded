"""Keys on disk under ``$TOOLPLANE_HOME/keys``.

    keys/index.json            every key's id, owner, algorithm, public material
                               (Ed25519), validity window and revocation; no secrets
    keys/private/<id>.key      the private key (Ed25519 raw seed) or HMAC secret,
                               base64, mode 0600

The control's signing key is owned by ``control``; each tool's receipt key by
``tool.<name>``. Rotation adds a new key and retires the old one (``not_after``):
it signs nothing more, and verifies what arrives within its grace
(toolplane.lifetimes). Revocation (``revoked_at``, ``revoked_reason``) ends a
key's trust at once; nothing here ever clears it, and rotation keeps it. The
index is the channel by which revocations reach the workers: they read it again
whenever it changes (:class:`IndexWatch`), and the writers replace it atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from toolplane.errors import SettingsError
from toolplane.signing import (
    Algorithm,
    Ed25519Signer,
    HmacSigner,
    PublicKey,
    Signer,
    b64decode,
    b64encode,
    key_id_for,
)

__all__ = ["IndexWatch", "KeyStore", "export_keys"]

T = TypeVar("T")


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _now() -> datetime:
    """Now, to the millisecond: signed times are epoch milliseconds, and windows must match."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _parse(at: str | None) -> datetime | None:
    return None if at is None else datetime.fromisoformat(at)


def _signs(entry: dict[str, Any]) -> bool:
    """Whether a key may sign: neither retired nor revoked."""
    return entry["not_after"] is None and entry.get("revoked_at") is None


class KeyStore:
    def __init__(self, keys_dir: Path) -> None:
        self.dir = keys_dir
        self.index_path = keys_dir / "index.json"
        self.private_dir = keys_dir / "private"

    # -- reading ---------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every key's entry; ``revoked_at`` and ``revoked_reason`` only once it is revoked."""
        try:
            text = self.index_path.read_text()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise SettingsError(
                f"cannot read the key index {self.index_path}: {e}", setting="HOME"
            ) from e
        try:
            entries = json.loads(text)["keys"]
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise TypeError("keys: not a list of objects")
        except (ValueError, KeyError, TypeError) as e:
            raise SettingsError(
                f"the key index {self.index_path} is malformed: {e}", setting="HOME"
            ) from e
        return list(entries)

    def entry(self, key_id: str) -> dict[str, Any] | None:
        return next((e for e in self.entries() if e["key_id"] == key_id), None)

    def stamp(self) -> str | None:
        """What changes whenever the index's content changes: its SHA-256 (None if absent).

        Not a ``stat``: two writes within one tick of a coarse filesystem clock, of the same
        size, onto a reused inode (``os.replace`` frees one and the next write may get it)
        look the same to it, and a worker would keep trusting a key retired since."""
        try:
            return hashlib.sha256(self.index_path.read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def owners(self) -> set[str]:
        return {entry["owner"] for entry in self.entries()}

    def _private_path(self, key_id: str) -> Path:
        return self.private_dir / (key_id.replace(":", "_").replace("/", "_") + ".key")

    def _active_entry(self, owner: str) -> dict[str, Any]:
        now = _now()
        active = [
            e
            for e in self.entries()
            if e["owner"] == owner and _signs(e) and datetime.fromisoformat(e["not_before"]) <= now
        ]
        if not active:
            raise SettingsError(
                f"no active key for {owner!r} in {self.dir} (run `toolplane keys init`)",
                setting="HOME",
            )
        return max(active, key=lambda e: e["not_before"])

    def signer(self, owner: str) -> Signer:
        entry = self._active_entry(owner)
        try:
            secret = b64decode(self._private_path(entry["key_id"]).read_text().strip())
        except OSError as e:
            raise SettingsError(f"cannot read private key of {owner!r}: {e}", setting="HOME") from e
        if entry["algorithm"] == "ed25519":
            private = Ed25519PrivateKey.from_private_bytes(secret)
            return Ed25519Signer(private_key=private, key_id=entry["key_id"], owner=owner)
        return HmacSigner(secret=secret, key_id=entry["key_id"], owner=owner)

    def public_keys(
        self, owners: Iterable[str] | None = None, *, with_secrets: bool = False
    ) -> list[PublicKey]:
        """Keys for verification; HMAC keys only ``with_secrets`` (they are shared secrets)."""
        wanted = None if owners is None else set(owners)
        keys = []
        for e in self.entries():
            if wanted is not None and e["owner"] not in wanted:
                continue
            if e["algorithm"] == "ed25519":
                material = b64decode(e["public"])
            elif with_secrets and self._private_path(e["key_id"]).exists():
                material = b64decode(self._private_path(e["key_id"]).read_text().strip())
            else:
                continue
            keys.append(
                PublicKey(
                    key_id=e["key_id"],
                    owner=e["owner"],
                    algorithm=e["algorithm"],
                    material=material,
                    not_before=datetime.fromisoformat(e["not_before"]),
                    not_after=_parse(e["not_after"]),
                    revoked_at=_parse(e.get("revoked_at")),
                )
            )
        return keys

    # -- writing ---------------------------------------------------------------
    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One writer at a time (a rotation must not drop a revocation written meanwhile)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": entries}, indent=2, sort_keys=True))
        os.replace(tmp, self.index_path)

    def _new_key(self, owner: str, algorithm: Algorithm) -> dict[str, Any]:
        if algorithm == "ed25519":
            private = Ed25519PrivateKey.generate()
            secret = private.private_bytes_raw()
            public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            key_id = key_id_for(owner, public)
            public_b64: str | None = b64encode(public)
        else:
            secret = secrets.token_bytes(32)
            key_id = key_id_for(owner, secrets.token_bytes(16))
            public_b64 = None
        self.private_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._private_path(key_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(b64encode(secret))
        return {
            "key_id": key_id,
            "owner": owner,
            "algorithm": algorithm,
            "public": public_b64,
            "not_before": _iso(_now()),
            "not_after": None,
        }

    def ensure(self, owner: str, algorithm: Algorithm) -> bool:
        """Create a key for ``owner`` unless one is active; True if one was created."""
        with self._writing():
            entries = self.entries()
            if owner in {e["owner"] for e in entries if _signs(e)}:
                return False
            self._write_index([*entries, self._new_key(owner, algorithm)])
            return True

    def ensure_all(
        self,
        tools: Iterable[str],
        *,
        receipt_algorithm: str,
        per_tool: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Control's key and a receipt key per tool, where missing; returns the owners created.

        A tool's new key is of its algorithm in ``per_tool``, else ``receipt_algorithm``. A tool
        that already has an active key keeps it, of whatever kind: ``rotate`` changes it."""
        created = ["control"] if self.ensure("control", "ed25519") else []
        for tool in tools:
            algorithm = (per_tool or {}).get(tool, receipt_algorithm)
            if self.ensure(f"tool.{tool}", algorithm):  # type: ignore[arg-type]
                created.append(f"tool.{tool}")
        return created

    def rotate(self, owner: str, algorithm: Algorithm) -> str:
        """A new active key for ``owner``; the old ones stop signing now (revocations stay)."""
        with self._writing():
            now = _iso(_now())
            entries = self.entries()
            for e in entries:
                if e["owner"] == owner and e["not_after"] is None:
                    e["not_after"] = now
            new = self._new_key(owner, algorithm)
            self._write_index([*entries, new])
            return str(new["key_id"])

    def record_revocation(self, key_id: str, *, revoked_at: datetime, reason: str) -> bool:
        """Mark ``key_id`` revoked at ``revoked_at``; False if unknown or revoked no later.

        An earlier revocation is never replaced by a later one, nor ever cleared."""
        with self._writing():
            entries = self.entries()
            for e in entries:
                if e["key_id"] != key_id:
                    continue
                known = _parse(e.get("revoked_at"))
                if known is not None and known <= revoked_at:
                    return False
                e["revoked_at"], e["revoked_reason"] = _iso(revoked_at), reason
                self._write_index(entries)
                return True
            return False


class IndexWatch(Generic[T]):
    """A value built from the key store, and built again whenever the index changes.

    Each :meth:`get` costs one read of the (small) index, so a caller may ask at every job.
    The stamp is taken before the index is read: a change made while it is read is
    seen at the next call. A build that fails raises, and the next call tries again.
    """

    def __init__(self, store: KeyStore, build: Callable[[KeyStore], T]) -> None:
        self.store = store
        self.build = build
        self._stamp: str | None = None
        self._value: T | None = None
        self._built = False

    def get(self) -> T:
        stamp = self.store.stamp()
        if not self._built or stamp != self._stamp:
            value = self.build(self.store)
            self._stamp, self._value, self._built = stamp, value, True
        return self._value  # type: ignore[return-value]

    def changed(self) -> bool:
        """Whether the index changed since the value was last built."""
        return not self._built or self.store.stamp() != self._stamp


def export_keys(
    store: KeyStore,
    dest: KeyStore,
    *,
    public: Iterable[str],
    signer: str,
    owner: tuple[int, int] | None = None,
) -> list[str]:
    """Write into ``dest`` the key subset one signer needs: ``store``'s index entries of
    ``public`` and ``signer`` as they are (public material, windows, revocations; no secret),
    and the private files of ``signer``'s keys that may still sign (neither retired nor
    revoked), mode 0400 and owned by ``owner`` (uid, gid; default ours). The private files
    are in place before the index that names them; any other private file in ``dest`` is
    removed after it. Returns the key ids whose files it holds.

    A tool's worker gets ``public={"control"}, signer="tool.<name>"``: the control's public
    keys to verify envelopes, its own receipt key to sign, nothing of other tools. It reads
    its index again before every job, so what this writes reaches a running worker.
    """
    owners = {*public, signer}
    dest.private_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The source's lock (not one in ``dest``, which its reader might hold to stall us): one
    # export at a time, of a snapshot no rotation or revocation changes meanwhile.
    with store._writing():
        entries = [e for e in store.entries() if e["owner"] in owners]
        signing = [e["key_id"] for e in entries if e["owner"] == signer and _signs(e)]
        for key_id in signing:
            secret = store._private_path(key_id).read_bytes()
            path = dest._private_path(key_id)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)  # left by a crash: 0400, so not writable again
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secret)
                if owner is not None:
                    os.fchown(handle.fileno(), *owner)
            os.replace(tmp, path)
        dest._write_index(entries)
        wanted = {dest._private_path(key_id).name for key_id in signing}
        for stale in dest.private_dir.iterdir():
            if stale.name not in wanted:
                stale.unlink()
    return signing
