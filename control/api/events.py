"""Following a run as it changes: Server-Sent Events pushed from commit, not polled.

A trigger writes every status change of a run or node to ``run_events`` and
notifies ``toolplane_run_events`` with the run id; PostgreSQL delivers the
notification when the change commits. One listening connection per API process
(:class:`RunEventHub`) wakes the streams of that run, which then read the new rows.
Each SSE event's id is the row's id, so a follower that reconnects with
``Last-Event-ID`` gets exactly what it has not seen, in order. While the listener is
down (the database restarting), streams read again every few seconds instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from control.orchestration.states import TERMINAL_RUN
from ledger.models import ApiToken, Run, RunEvent

log = logging.getLogger("toolplane.api.events")

CHANNEL = "toolplane_run_events"
KEEPALIVE_S = 15.0  # a comment line so that proxies and clients see the stream alive
REREAD_S = 5.0  # a stream reads again this often even without a notification
BATCH = 500
LAST_ID = 2**63 - 1  # run_events.id is a bigint: no event's id is larger

__all__ = ["CHANNEL", "LAST_ID", "RunEventHub", "event_stream", "libpq_url"]


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL as libpq takes it (psycopg's own connect)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class RunEventHub:
    """One LISTEN connection for the whole process; wakes the streams of a run."""

    def __init__(self, database_url: str) -> None:
        self._dsn = libpq_url(database_url)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.listening = False

    @contextlib.contextmanager
    def subscribe(self, run_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[run_id]

    def _wake(self, run_id: str | None = None) -> None:
        groups = self._waiters.values() if run_id is None else [self._waiters.get(run_id, set())]
        for waiters in groups:
            for event in waiters:
                event.set()

    async def run(self) -> None:
        """Listen until cancelled; reconnect (waking everyone, who read again) on failure."""
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=5
                ) as connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self.listening, delay = True, 0.5
                    self._wake()  # what changed while we were not listening
                    async for notify in connection.notifies():
                        self._wake(notify.payload)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as e:
                log.warning("events.listen_failed retry_in=%.1fs error=%s", delay, e)
            finally:
                self.listening = False
            self._wake()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _read(
    sessions: sessionmaker[Session], run_id: str, after: int, token_id: str | None
) -> tuple[list[RunEvent], str | None, bool]:
    """The run's status, then its events after ``after``: read in that order, the events
    include every change committed before a terminal status was seen (none follow it).
    Last, whether the follower's token is still good (not revoked, not expired)."""
    with sessions() as session:
        if token_id is not None and not _token_good(session, token_id):
            return [], None, False
        status = session.scalar(select(Run.status).where(Run.id == run_id))
        rows = list(
            session.scalars(
                select(RunEvent)
                .where(RunEvent.run_id == run_id, RunEvent.id > after)
                .order_by(RunEvent.id)
                .limit(BATCH)
            )
        )
        session.expunge_all()
    return rows, status, True


def _token_good(session: Session, token_id: str) -> bool:
    found = session.execute(
        select(ApiToken.revoked_at, ApiToken.expires_at).where(ApiToken.id == token_id)
    ).first()
    if found is None or found.revoked_at is not None:
        return False
    return found.expires_at is None or found.expires_at > datetime.now(UTC)


def _frame(row: RunEvent) -> str:
    data = {
        "id": row.id,
        "run_id": row.run_id,
        "node_id": row.node_id,
        "status": row.status,
        "attempt": row.attempt,
        "at": row.at.isoformat(),
    }
    kind = "run" if row.node_id is None else "node"
    return f"id: {row.id}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def event_stream(
    hub: RunEventHub,
    sessions: sessionmaker[Session],
    run_id: str,
    *,
    after: int,
    disconnected: Callable[[], Any],
    token_id: str | None = None,
) -> AsyncIterator[str]:
    """The run's events after ``after``, then each new one as it commits; ends after the
    run's terminal status (an ``end`` event), when the client goes away, or when the
    follower's token (``token_id``) is revoked or expires: the stream closes without
    ``end``, and reconnecting gets 401."""
    with hub.subscribe(run_id) as woken:
        yield "retry: 1000\n\n"
        idle = 0.0
        while True:
            woken.clear()
            rows, run_status, allowed = await run_in_threadpool(
                _read, sessions, run_id, after, token_id
            )
            if not allowed:
                return
            for row in rows:
                after = row.id
                yield _frame(row)
            if run_status in TERMINAL_RUN and len(rows) < BATCH:
                ended = json.dumps({"run_id": run_id, "status": run_status})
                yield f"event: end\ndata: {ended}\n\n"
                return
            if len(rows) == BATCH:
                continue
            wait = REREAD_S if hub.listening else 1.0
            try:
                await asyncio.wait_for(woken.wait(), timeout=min(wait, KEEPALIVE_S))
                idle = 0.0
            except TimeoutError:
                idle += wait
                if idle >= KEEPALIVE_S:
                    idle = 0.0
                    yield ": keep-alive\n\n"
            if await disconnected():
                return
