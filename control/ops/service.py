"""The control process: results ingest, manifest registration, and a loop that relays
the outbox, sweeps overdue and retryable attempts, and expires unanswered approvals.

Runs as a Celery worker consuming only the ``results`` queue, with acks late:
a result is acknowledged only after its transaction committed. The results that
wait are ingested in batches of up to ``TOOLPLANE_INGEST_BATCH`` per transaction
(control.ops.batcher), each acknowledged after its batch committed. While the
database is unreachable, the ingest task waits for it with the message held
(unacknowledged); after a while it hands the message back to the queue
(published again before the old copy is acknowledged), so nothing is lost
and the ingest catches up when the database returns. A control process killed
at any instant leaves its unacknowledged results to come back after the
broker's visibility timeout, and its committed but unpublished jobs to the
next relay.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from amqp.exceptions import ChannelError
from celery import Celery, Task, signals
from sqlalchemy.exc import InterfaceError, OperationalError

import celeryconfig
from celeryconfig import RESTORE_INTERVAL_S
from control.broker import screen as broker_screen
from control.broker.queues import declare_results_queue
from control.governance.approvals import expire_approvals
from control.ops.batcher import ResultBatcher
from control.ops.metrics import install as install_metrics
from control.ops.runtime import ControlPlane
from control.ops.tracing import start_control_tracing
from control.orchestration.dispatch import publish_pending
from control.orchestration.ingest import (
    Ingested,
    advance_ready,
    ingest_batch,
    record_unprocessable,
)
from control.orchestration.manifests import register_manifest
from control.orchestration.orchestrator import release_reservations, sweep
from ledger.receipts import ReceiptProblem

log = logging.getLogger("toolplane.control")

RELAY_INTERVAL_S = 1.0
RELAY_GRACE_S = 5.0
DB_WAIT_S = 20.0  # how long one ingest waits for the database before handing the message back
RELEASE_INTERVAL_S = 10.0  # how often reservations of attempts with no result are released
INGEST_RETRIES = 5  # then a message ingest keeps failing on is recorded as IngestFailed

__all__ = ["build_control_app", "run_control"]


def _only_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if len(args) == 1 and not kwargs else {"args": list(args), **kwargs}


def build_control_app(plane: ControlPlane, stop: threading.Event) -> Celery:
    app = plane.celery
    app.conf.task_default_queue = celeryconfig.RESULTS_QUEUE
    app.conf.worker_consumer = broker_screen.CONSUMER_PATH  # a worker may push anything there

    def settle(tenant_id: str, job_id: str, charged_ms: int | None) -> None:
        store = plane.entitlements
        if store is None:
            return
        try:
            store.settle(tenant_id=tenant_id, job_id=job_id, charged_ms=charged_ms)
        except Exception:  # the reservation stays charged: errs towards refusing, never over
            log.warning("entitlement.settle_failed job=%s", job_id, exc_info=True)

    inflight = InFlight()
    fault = _fault_point()

    def ingest_many(raws: Sequence[Any]) -> list[Ingested]:
        with plane.sessions() as session:
            return ingest_batch(
                session,
                raws,
                plane.keyring(),
                plane.governance(),
                settle,
                before_commit=(lambda: fault("before_commit", len(raws))) if fault else None,
                advance=False,  # each task decides its run's ready nodes: the batch acks sooner
            )

    batcher: ResultBatcher[Ingested] = ResultBatcher(
        ingest_many,
        max_batch=plane.settings.ingest_batch,
        after_ingest=(lambda size: fault("after_commit", size)) if fault else None,
    )

    @app.task(name=celeryconfig.INGEST_TASK, bind=True, acks_late=True, max_retries=None)
    def ingest(self: Task, *args: Any, **kwargs: Any) -> str:
        with inflight:
            return _ingest(self, _only_arg(args, kwargs))

    def _ingest(self: Task, raw: Any) -> str:
        deadline = time.monotonic() + DB_WAIT_S
        delay = 0.25
        while True:
            try:
                ingested = batcher.submit(raw)
                break
            except (OperationalError, InterfaceError) as e:
                inflight.database_error()
                problem = str(e).splitlines()[0]
                if time.monotonic() >= deadline:
                    log.warning("ingest.requeue error=%s", problem)
                    raise self.retry(countdown=2) from e
                log.warning("ingest.waiting_for_database in=%.2fs error=%s", delay, problem)
                time.sleep(delay)
                delay = min(delay * 2, 4.0)
            except Exception as e:  # a bug or a dependency down: never drop the result unsaid
                if self.request.retries < INGEST_RETRIES:
                    log.exception("ingest.failed retry=%s", self.request.retries + 1)
                    raise self.retry(countdown=min(2**self.request.retries, 30)) from e
                log.exception("ingest.gave_up: recorded as IngestFailed")
                with plane.sessions() as session:
                    record_unprocessable(session, raw, e)
                return "unprocessable"
        outbox_ids = ingested.outbox_ids
        if ingested.ready_run is not None:
            with plane.sessions() as session:
                outbox_ids = advance_ready(session, plane.governance(), ingested.ready_run)
        if outbox_ids:
            try:
                publish_pending(plane.sessions, plane.publisher, ids=outbox_ids)
            except Exception:  # committed: the relay publishes what this could not
                log.warning("ingest.publish_failed (the relay retries)", exc_info=True)
        return ingested.outcome.value

    @app.task(name=celeryconfig.MANIFEST_TASK, bind=True, acks_late=True, max_retries=None)
    def manifest(self: Task, *args: Any, **kwargs: Any) -> str | None:
        try:
            with plane.sessions() as session:
                return register_manifest(
                    session, _only_arg(args, kwargs), plane.keyring(refresh=True)
                )
        except ReceiptProblem as e:
            log.warning("manifest.refused %s", e)
            return None
        except (OperationalError, InterfaceError) as e:
            raise self.retry(countdown=2) from e

    caught_up = CaughtUp(
        app, inflight, grace_s=plane.settings.visibility_timeout + 2 * RESTORE_INTERVAL_S
    )

    def relay() -> None:
        next_release = 0.0
        while not stop.wait(RELAY_INTERVAL_S):
            try:
                sent = publish_pending(plane.sessions, plane.publisher, older_than_s=RELAY_GRACE_S)
                if sent:
                    log.warning("outbox.relayed count=%s", sent)
            except Exception:  # a loop boundary: log and go on
                log.exception("outbox.relay_failed")
            try:
                with plane.sessions() as session:
                    expired = expire_approvals(session)
                if expired:
                    log.warning("approvals.expired count=%s", expired)
            except Exception:
                log.exception("approvals.expiry_failed")
            if time.monotonic() >= next_release:
                next_release = time.monotonic() + RELEASE_INTERVAL_S
                try:
                    released = release_reservations(plane.sessions, plane.entitlements)
                    if released:
                        log.warning("reservations.released count=%s", released)
                except Exception:
                    log.exception("reservations.release_failed")
            try:
                swept = sweep(plane.sessions, plane.governance(), time_out=caught_up())
                if swept.outbox_ids:
                    publish_pending(plane.sessions, plane.publisher, ids=swept.outbox_ids)
                if swept.timed_out or swept.retried or swept.dispatched:
                    log.warning(
                        "sweep.swept timed_out=%s retried=%s dispatched=%s",
                        swept.timed_out,
                        swept.retried,
                        swept.dispatched,
                    )
            except Exception:
                log.exception("sweep.failed")

    def checkpointer() -> None:
        """After appends, never in them: integrate the chains and sign checkpoints."""
        interval = plane.settings.checkpoint_interval_s
        while interval and not stop.wait(interval):
            try:
                plane.checkpoint()
            except Exception:  # a loop boundary: log and go on
                log.exception("checkpoint.failed")

    @signals.worker_ready.connect(weak=False)
    def start_relay(sender: Any = None, **_: Any) -> None:
        threading.Thread(target=relay, name="outbox-relay", daemon=True).start()
        threading.Thread(target=checkpointer, name="checkpointer", daemon=True).start()

    @signals.worker_shutdown.connect(weak=False)
    def stop_relay(sender: Any = None, **_: Any) -> None:
        stop.set()

    return app


FAULT_FILE_ENV = "TP_TEST_INGEST_FAULT"
"""Tests only: a file naming a point (``before_commit`` or ``after_commit``) at which the
control kills itself (SIGKILL) once, in the first batch of two or more results there."""


def _fault_point() -> Callable[[str, int], None] | None:
    path = os.environ.get(FAULT_FILE_ENV)
    if not path:
        return None

    def fault(point: str, size: int) -> None:
        try:
            wanted = Path(path).read_text().strip()
        except FileNotFoundError:
            return
        if wanted == point and size >= 2:
            Path(path).unlink()
            log.warning("ingest.fault point=%s size=%s: killing this process", point, size)
            os.kill(os.getpid(), signal.SIGKILL)

    return fault


class InFlight:
    """The results this process is ingesting (or holding while the database is down)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.last_database_error = float("-inf")

    def __enter__(self) -> None:
        with self._lock:
            self.count += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self.count -= 1

    def database_error(self) -> None:
        self.last_database_error = time.monotonic()


class CaughtUp:
    """Whether the control has read the results there are, so that an attempt with no
    result is really late and not a result still waiting in the queue.

    Not before the results that a dead control process held come back (the visibility
    timeout after this one started), not while this process holds results (ingesting,
    or waiting for the database) nor for that long after its last database error (the
    results it handed back come round again), and not while results wait in the queue,
    unless they have waited without a break for that long too (a backlog that never
    clears must not stop timeouts for ever). Unknown (the broker unreachable) is no.
    """

    def __init__(self, app: Celery, inflight: InFlight | None = None, *, grace_s: float) -> None:
        self.app = app
        self.inflight = inflight or InFlight()
        self.grace_s = grace_s
        self.started = time.monotonic()
        self.backlog_since: float | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.started < self.grace_s:
            return False
        if now - self.inflight.last_database_error < self.grace_s:
            return False
        try:
            waiting = self.results_waiting()
        except Exception:  # the broker is down: nothing can be said to be late
            log.warning("sweep.broker_unreachable", exc_info=True)
            return False
        if waiting == 0 and self.inflight.count == 0:
            self.backlog_since = None
            return True
        self.backlog_since = self.backlog_since or now
        return now - self.backlog_since >= self.grace_s

    def results_waiting(self) -> int:
        with self.app.connection_for_read() as connection:
            try:
                declared = connection.default_channel.queue_declare(
                    queue=celeryconfig.RESULTS_QUEUE, passive=True
                )
            except ChannelError as e:
                if "NOT_FOUND" in str(e):  # Redis: an empty queue is a list that has no key
                    return 0
                raise
            return int(declared.message_count)


def run_control(
    plane: ControlPlane, *, concurrency: int = 4, loglevel: str = "INFO", api: bool = True
) -> None:
    """Results ingest, relay and sweeper as a Celery worker on ``results``; with ``api``, the
    HTTP API too, from a thread of this process (on TOOLPLANE_API_BIND)."""
    broker_screen.install()  # a tool's workers may push anything onto results
    on = plane.settings.metrics == "on"
    install_metrics(plane.settings.home, plane.engine, on=on)  # before prometheus_client
    start_control_tracing()  # ingest, sweeper and the API's thread: spans if OTLP is set
    plane.check_database()
    plane.sync_keys()
    plane.policy  # noqa: B018 - load and record the policy version before serving
    if api:
        from control.api.server import serve_in_thread

        serve_in_thread(ControlPlane.from_plane(plane), log_level=loglevel.lower())
    declare_results_queue(plane.celery)  # a worker's announcement must find its binding
    app = build_control_app(plane, threading.Event())
    app.worker_main(
        [
            *(["--quiet"] if plane.settings.log_format == "json" else []),  # no banner
            "worker",
            "-Q",
            celeryconfig.RESULTS_QUEUE,
            "-n",
            "control@%h",
            "--pool",
            "threads",
            "--concurrency",  # a thread per result a batch may hold, waiting for its commit
            str(max(concurrency, plane.settings.ingest_batch)),
            "-E",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            loglevel,
        ]
    )
