"""Gathering the results that wait into batches for ingest, acknowledged after the commit.

The control consumes ``results`` as a Celery worker with acks late: each message is a task
on a thread of the worker's pool, acknowledged when its task returns. A task hands its
message to the ``ResultBatcher`` and waits; the batcher's one thread takes every message
handed over so far (up to ``max_batch``), ingests them together, and only then lets each
task return with its own outcome (or raise its own error). So a message is acknowledged
only after the transaction that ingested it committed; a process killed before that
leaves it unacknowledged, to come back after the broker's visibility timeout, when
exactly-once acceptance makes the second copy ResultIgnored.

The batcher never waits to fill a batch: an idle control ingests a lone result at once,
and a busy one ingests what arrived while it was committing the last batch. A batch that
fails on something other than the database (a bug, a dependency down) is ingested again
one message at a time, so that one poison message fails only its own task (which retries
and at last records it, as before) and never its neighbours.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

log = logging.getLogger("toolplane.ingest")

T = TypeVar("T")

__all__ = ["ResultBatcher"]


class _Waiting(Generic[T]):
    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.done = threading.Event()
        self.outcome: T | None = None
        self.error: BaseException | None = None


class ResultBatcher(Generic[T]):
    """``submit(raw)`` from many threads; ``ingest(raws)`` called on one thread, in batches.

    ``ingest`` returns one outcome per message, in order, having committed; it raises for
    the whole batch otherwise. ``after_ingest(size)`` runs after each batch committed and
    before any of its tasks returns (a fault-injection point for tests)."""

    def __init__(
        self,
        ingest: Callable[[Sequence[Any]], list[T]],
        *,
        max_batch: int,
        after_ingest: Callable[[int], None] | None = None,
    ) -> None:
        self._ingest = ingest
        self._max_batch = max(1, max_batch)
        self._after_ingest = after_ingest
        self._queue: queue.SimpleQueue[_Waiting[T]] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def submit(self, raw: Any) -> T:
        """Ingest ``raw`` in the next batch; its outcome once that batch committed."""
        waiting: _Waiting[T] = _Waiting(raw)
        self._start()
        self._queue.put(waiting)
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        assert waiting.outcome is not None
        return waiting.outcome

    def _start(self) -> None:
        with self._lock:
            if not self._started:
                threading.Thread(target=self._run, name="ingest-batcher", daemon=True).start()
                self._started = True

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._ingest_batch(batch)
            except BaseException as e:  # a loop boundary: every waiting task gets the error
                log.exception("ingest.batch_failed size=%s", len(batch))
                for waiting in batch:
                    if not waiting.done.is_set():
                        waiting.error = e
                        waiting.done.set()

    def _ingest_batch(self, batch: list[_Waiting[T]]) -> None:
        try:
            outcomes = self._ingest([w.raw for w in batch])
        except (OperationalError, InterfaceError) as e:  # each task waits and retries
            self._fail(batch, e)
            return
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch, e)
                return
            log.warning("ingest.batch_split size=%s (one at a time)", len(batch), exc_info=True)
            for waiting in batch:
                self._ingest_batch([waiting])
            return
        log.debug("ingest.batch size=%s", len(batch))
        if self._after_ingest is not None:
            self._after_ingest(len(batch))
        for waiting, outcome in zip(batch, outcomes, strict=True):
            waiting.outcome = outcome
            waiting.done.set()

    @staticmethod
    def _fail(batch: list[_Waiting[T]], error: BaseException) -> None:
        for waiting in batch:
            waiting.error = error
            waiting.done.set()
