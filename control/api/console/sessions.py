"""The console's sessions: server-side, bound to the API token they were opened with.

The browser holds only a random session id (the cookie). The server keeps, under a
hash of that id, the token sealed with a key derived from the id (AES-GCM), the
session's CSRF secret and when it opened (both authenticated by the seal): a copy of
the store alone yields no token, and the cookie alone is no token either. Every request
opens the token again and authenticates it exactly as the API does, so a revoked or
expired token ends the session at its next request.

Two stores: Redis (the control's own, shared by every API process) and memory (one
process; where no Redis is configured, and in tests of the pages' logic).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from control.errors import ServiceUnavailable

__all__ = [
    "IDLE_S",
    "LIFETIME_S",
    "ConsoleSession",
    "MemorySessionStore",
    "RedisSessionStore",
    "SessionStore",
    "open_session",
    "seal",
]

IDLE_S = 8 * 3600  # a session unused this long is gone
LIFETIME_S = 12 * 3600  # and none lives longer, used or not
PREFIX = "toolplane:console:session:"


@dataclass(frozen=True)
class ConsoleSession:
    """An open session: the token it is bound to and its CSRF secret."""

    token: str
    csrf: str
    opened_at: float


def _lookup(session_id: str) -> str:
    return hashlib.sha256(b"toolplane-console-lookup\0" + session_id.encode()).hexdigest()


def _key(session_id: str) -> bytes:
    return hashlib.sha256(b"toolplane-console-seal\0" + session_id.encode()).digest()


def _bound(csrf: str, opened_at: float) -> bytes:
    """What the seal authenticates beside the token: the CSRF secret and the opening time,
    so that a writer of the store can neither plant a CSRF secret nor stretch a session."""
    return f"toolplane-console\0{csrf}\0{opened_at!r}".encode()


def seal(session_id: str, token: str, csrf: str, opened_at: float) -> str:
    """The stored record of a session: its token sealed under a key only the id gives."""
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_key(session_id)).encrypt(nonce, token.encode(), _bound(csrf, opened_at))
    return json.dumps(
        {
            "token": base64.b64encode(nonce + sealed).decode(),
            "csrf": csrf,
            "opened_at": opened_at,
        }
    )


def open_session(session_id: str, record: str) -> ConsoleSession | None:
    """The session a stored record holds, or None if it does not open (or is too old)."""
    try:
        data = json.loads(record)
        raw = base64.b64decode(data["token"])
        opened_at = float(data["opened_at"])
        csrf = str(data["csrf"])
        token = AESGCM(_key(session_id)).decrypt(raw[:12], raw[12:], _bound(csrf, opened_at))
    except (ValueError, KeyError, TypeError, InvalidTag):
        return None
    if time.time() - opened_at > LIFETIME_S:
        return None
    return ConsoleSession(token=token.decode(), csrf=csrf, opened_at=opened_at)


class SessionStore(Protocol):
    def create(self, token: str) -> tuple[str, ConsoleSession]:
        """A new session for ``token``: its id (the cookie) and the session."""
        ...

    def get(self, session_id: str) -> ConsoleSession | None: ...

    def delete(self, session_id: str) -> None: ...


def _new(token: str) -> tuple[str, ConsoleSession, str]:
    session_id = secrets.token_urlsafe(32)
    session = ConsoleSession(token=token, csrf=secrets.token_urlsafe(32), opened_at=time.time())
    return session_id, session, seal(session_id, token, session.csrf, session.opened_at)


@contextlib.contextmanager
def _reaching() -> Iterator[None]:
    try:
        yield
    except redis.RedisError as e:
        raise ServiceUnavailable("redis", f"the console's session store: {e}") from e


class RedisSessionStore:
    """Sessions in the control's Redis: every API process sees every session."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    @classmethod
    def from_url(cls, url: str) -> RedisSessionStore:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5))

    def create(self, token: str) -> tuple[str, ConsoleSession]:
        session_id, session, record = _new(token)
        with _reaching():
            self._redis.set(PREFIX + _lookup(session_id), record, ex=IDLE_S)
        return session_id, session

    def get(self, session_id: str) -> ConsoleSession | None:
        key = PREFIX + _lookup(session_id)
        with _reaching():
            record = self._redis.getex(key, ex=IDLE_S)
        if record is None:
            return None
        text = record.decode() if isinstance(record, bytes) else str(record)
        return open_session(session_id, text)

    def delete(self, session_id: str) -> None:
        with _reaching():
            self._redis.delete(PREFIX + _lookup(session_id))


class MemorySessionStore:
    """Sessions in this process only (one API process, or tests)."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def create(self, token: str) -> tuple[str, ConsoleSession]:
        session_id, session, record = _new(token)
        with self._lock:
            now = time.monotonic()
            self._records = {k: v for k, v in self._records.items() if v[1] > now}
            self._records[_lookup(session_id)] = (record, now + IDLE_S)
        return session_id, session

    def get(self, session_id: str) -> ConsoleSession | None:
        key = _lookup(session_id)
        with self._lock:
            found = self._records.get(key)
            if found is None or found[1] <= time.monotonic():
                self._records.pop(key, None)
                return None
            self._records[key] = (found[0], time.monotonic() + IDLE_S)
        return open_session(session_id, found[0])

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._records.pop(_lookup(session_id), None)
