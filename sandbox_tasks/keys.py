"""A worker's keys: the control's public keys it verifies envelopes with, and its own
tool's signer, both read from the key store and read again whenever its index changes.

This is how revocations reach a worker: ``toolplane keys revoke`` (and ``keys rotate``)
replace the key store's index, and a worker looks at the index before every job (one
read; it parses the index again only when its content changed). So a job received after a
revocation is judged with it, without a restart. An index that cannot be read or
parsed fails closed: the worker then refuses jobs until it can read it again.

The signer follows a rotation or a revocation where the new key's private file is
where the key store keeps it (one host, ``toolplane up``); where it is not (a
container given only the old key's file), the worker keeps signing with the key it
has, says so in its log, and must be recreated with the new key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from toolplane.errors import SettingsError
from toolplane.keystore import IndexWatch, KeyStore
from toolplane.signing import KeyRing, Signer

log = logging.getLogger("toolplane.worker")

__all__ = ["FixedKeys", "KeyStoreKeys", "WorkerKeys"]


class WorkerKeys(Protocol):
    """The keys port of a worker."""

    def control_ring(self) -> KeyRing:
        """The control's public keys as of now; raises SettingsError if they cannot be read."""
        ...

    def signer(self) -> Signer:
        """The tool's receipt key as of now."""
        ...


@dataclass(frozen=True)
class FixedKeys:
    """Keys that never change (tests, benchmarks)."""

    ring: KeyRing
    own: Signer

    def control_ring(self) -> KeyRing:
        return self.ring

    def signer(self) -> Signer:
        return self.own


def _control_ring(store: KeyStore) -> KeyRing:
    ring = KeyRing(store.public_keys(["control"]))
    if not len(ring):
        raise SettingsError(
            f"no public key of control in {store.index_path} (run `toolplane keys init`)",
            setting="HOME",
        )
    return ring


class KeyStoreKeys:
    """The worker's keys from its key store, re-read whenever the index changes."""

    def __init__(self, store: KeyStore, *, owner: str) -> None:
        self.owner = owner
        self._ring = IndexWatch(store, _control_ring)
        self._signer = IndexWatch(store, lambda s: s.signer(owner))
        self._last: Signer = self._signer.get()  # fails the worker's start if missing
        self._ring.get()
        self._told = ""

    def control_ring(self) -> KeyRing:
        return self._ring.get()

    def signer(self) -> Signer:
        try:
            signer = self._signer.get()
        except SettingsError as e:  # e.g. the new key's private file is not mounted here
            if str(e) != self._told:  # once per problem, not at every job
                self._told = str(e)
                log.warning(
                    "keys.signer_stale owner=%s key=%s problem=%s", self.owner, self._last.key_id, e
                )
            return self._last
        if signer.key_id != self._last.key_id:
            log.info("keys.signer_changed owner=%s key=%s", self.owner, signer.key_id)
            self._last = signer
        return signer
