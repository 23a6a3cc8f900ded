"""The control's side of the key lifecycle: the ledger's key table, revocation, and the
ring that one received message is judged by.

The key store's index (``toolplane.keystore``) holds every key and is what workers
read; the ledger's ``signing_keys`` table mirrors it for the control and for
verification. Revocations go both ways: ``sync_keys`` keeps the earliest retirement
and the earliest revocation that either side knows and writes revocations back to
the index, so no sync, rotation or restored file ever un-revokes a key (migration
0007 also refuses it in the database).

Revocation and ingest are ordered by the key's row: a revocation locks it
``FOR UPDATE`` and only then reads the clock; ingest locks it ``FOR KEY SHARE`` and
only then reads the clock it judges the receipt at (and records its evidence at).
Either the revocation committed first, and ingest refuses the receipt, or it waits
for ingest's commit and takes a later time: a receipt that the ledger holds is
never newer than its key's revocation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, sessionmaker

from control.errors import UsageError, require_text
from ledger.chain import NewEvent
from ledger.models import SigningKey
from ledger.store import append_events
from toolplane.keystore import KeyStore
from toolplane.signing import KeyRing

log = logging.getLogger("toolplane.keys")

Clock = Callable[[], datetime]

__all__ = ["Revocation", "judge_key", "revoke_key", "sync_keys", "utc_now"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def _ceil_ms(at: datetime) -> datetime:
    """Up to the next whole millisecond: workers judge by millisecond times (floored), so a
    revocation at a whole millisecond R refuses exactly what they receive from R on, and it
    stays later than the clock reading it was taken from."""
    if at.microsecond % 1000 == 0:
        return at
    return at.replace(microsecond=at.microsecond // 1000 * 1000) + timedelta(milliseconds=1)


def _parse(at: str | None) -> datetime | None:
    return None if at is None else datetime.fromisoformat(at)


@dataclass(frozen=True)
class Revocation:
    """What ``toolplane keys revoke`` did."""

    key_id: str
    owner: str
    revoked_at: datetime
    reason: str
    already: bool  # revoked before: nothing new was recorded
    replacement: str | None  # the owner's new key, when the revoked one was its active key

    def as_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "owner": self.owner,
            "revoked_at": self.revoked_at.isoformat(),
            "reason": self.reason,
            "already_revoked": self.already,
            "replacement": self.replacement,
        }


def _revoked_event(row: SigningKey, *, by: str) -> NewEvent:
    assert row.revoked_at is not None
    return NewEvent(
        "KeyRevoked",
        {
            "key_id": row.key_id,
            "owner": row.owner,
            "algorithm": row.algorithm,
            "revoked_at": row.revoked_at.isoformat(),
            "reason": row.revoked_reason,
            "by": by,
        },
    )


def _row_values(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "key_id": entry["key_id"],
        "owner": entry["owner"],
        "algorithm": entry["algorithm"],
        "public_key": entry["public"],
        "not_before": datetime.fromisoformat(entry["not_before"]),
        "not_after": _parse(entry["not_after"]),
        "revoked_at": _parse(entry.get("revoked_at")),
        "revoked_reason": entry.get("revoked_reason"),
    }


def sync_keys(session: Session, store: KeyStore) -> int:
    """Mirror the key store in ``signing_keys`` and revocations back; returns the keys synced.

    A key's material comes from the store; its retirement and revocation are the
    earliest of both sides. A revocation the table did not know is recorded as
    KeyRevoked (``by: sync``). Commits."""
    entries = store.entries()
    rows = {row.key_id: row for row in session.scalars(select(SigningKey).with_for_update())}
    events: list[NewEvent] = []
    for entry in entries:
        values = _row_values(entry)
        row = rows.get(entry["key_id"])
        if row is None:
            row = SigningKey(**values)
            session.add(row)
            rows[row.key_id] = row
            if row.revoked_at is not None:
                events.append(_revoked_event(row, by="sync"))
            continue
        row.owner, row.algorithm = values["owner"], values["algorithm"]
        row.public_key, row.not_before = values["public_key"], values["not_before"]
        if values["not_after"] is not None and (
            row.not_after is None or values["not_after"] < row.not_after
        ):
            row.not_after = values["not_after"]
        revoked = values["revoked_at"]
        if revoked is not None and (row.revoked_at is None or revoked < row.revoked_at):
            row.revoked_at, row.revoked_reason = revoked, values["revoked_reason"]
            events.append(_revoked_event(row, by="sync"))
    session.flush()
    append_events(session, events)
    session.commit()
    for row in rows.values():
        if row.revoked_at is not None:
            _tell_store(store, row)
    return len(entries)


def _tell_store(store: KeyStore, row: SigningKey) -> None:
    """Write a revocation into the key store's index, where the workers read it."""
    assert row.revoked_at is not None
    try:
        store.record_revocation(
            row.key_id, revoked_at=row.revoked_at, reason=row.revoked_reason or ""
        )
    except OSError as e:  # a read-only index (a container's mounted secret)
        log.warning(
            "keys.revocation_not_written key=%s index=%s error=%s", row.key_id, store.index_path, e
        )


def revoke_key(
    sessions: sessionmaker[Session],
    store: KeyStore,
    key_id: str,
    *,
    reason: str,
    clock: Clock = utc_now,
) -> Revocation:
    """Revoke ``key_id`` now: in the ledger (KeyRevoked), then in the key store's index.

    A key that its owner still signed with is replaced by a new key of the same
    algorithm at once (as ``keys rotate`` does), so that the control and the workers
    can go on signing. Revoking a revoked key again records nothing new and completes
    what a failed earlier attempt may have left undone (the index, the replacement)."""
    reason = require_text(reason, field="--reason", max_chars=500)
    entry = store.entry(key_id)
    with sessions() as session:
        if entry is not None:  # rotation writes only the index: the table may not have it yet
            session.execute(
                pg_insert(SigningKey).values(**_row_values(entry)).on_conflict_do_nothing()
            )
        row = session.scalar(
            select(SigningKey).where(SigningKey.key_id == key_id).with_for_update()
        )
        if row is None:
            raise UsageError(
                f"no key {key_id!r} in the key store ({store.index_path}) or the ledger",
                field="KEY_ID",
            )
        already = row.revoked_at is not None
        if not already:
            # The clock is read after the row's lock: see the module's docstring.
            row.revoked_at, row.revoked_reason = _ceil_ms(clock()), reason
            session.flush()
            append_events(session, [_revoked_event(row, by="keys revoke")], at=row.revoked_at)
        session.commit()
        assert row.revoked_at is not None
        done = Revocation(
            key_id=key_id,
            owner=row.owner,
            revoked_at=row.revoked_at,
            reason=row.revoked_reason or "",
            already=already,
            replacement=None,
        )
        _tell_store(store, row)
    log.warning("key.revoked key=%s owner=%s already=%s", key_id, done.owner, already)
    signed_with = (
        entry is not None and entry["not_after"] is None and entry.get("revoked_at") is None
    )
    if not signed_with:
        return done
    assert entry is not None
    replacement = store.rotate(entry["owner"], entry["algorithm"])
    with sessions() as session:
        sync_keys(session, store)
    log.warning("key.replaced owner=%s key=%s", entry["owner"], replacement)
    return replace(done, replacement=replacement)


def judge_key(
    session: Session, keys: KeyRing, key_id: object, *, clock: Clock = utc_now
) -> tuple[KeyRing, datetime]:
    """The ring to judge a message signed by ``key_id`` with, and the time to judge it at.

    Locks the key's row (``FOR KEY SHARE``, in the caller's transaction) and then reads
    the clock, so that a concurrent revocation is either seen or later than the
    returned time (see the module's docstring). The row's retirement and revocation
    are merged into the ring's (cached) key. The caller records its evidence at the
    returned time, which is when the ledger's verification judges the key again."""
    ok = (  # an id the database can look up: no NUL, no lone surrogate (no column takes it)
        isinstance(key_id, str)
        and 0 < len(key_id) <= 120
        and "\x00" not in key_id
        and not any("\ud800" <= c <= "\udfff" for c in key_id)
    )
    if ok:
        row = session.execute(
            select(SigningKey.not_after, SigningKey.revoked_at)
            .where(SigningKey.key_id == key_id)
            .with_for_update(read=True, key_share=True)
        ).first()
        known = keys.get(str(key_id))
        if row is not None and known is not None:
            keys = keys.with_key(known.merged(not_after=row.not_after, revoked_at=row.revoked_at))
    return keys, clock()
