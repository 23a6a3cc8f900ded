"""The control process: results ingest, manifest registration, the outbox relay,
and the expiry of approval requests that nobody answered.

Runs as a Celery worker consuming only the ``results`` queue. A database error
while ingesting retries the message (published again before the old one is
acknowledged), so a result is never acknowledged before it is committed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, Task, signals
from sqlalchemy.exc import InterfaceError, OperationalError

import celeryconfig
from control.approvals import expire_approvals
from control.dispatch import publish_pending
from control.ingest import ingest_result, register_manifest
from control.runtime import ControlPlane
from ledger.receipts import ReceiptProblem

log = logging.getLogger("toolplane.control")

RELAY_INTERVAL_S = 1.0
RELAY_GRACE_S = 5.0

__all__ = ["build_control_app", "run_control"]


def _only_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if len(args) == 1 and not kwargs else {"args": list(args), **kwargs}


def build_control_app(plane: ControlPlane, stop: threading.Event) -> Celery:
    app = plane.celery
    app.conf.task_default_queue = celeryconfig.RESULTS_QUEUE

    def settle(tenant_id: str, job_id: str, charged_ms: int | None) -> None:
        store = plane.entitlements
        if store is None:
            return
        try:
            store.settle(tenant_id=tenant_id, job_id=job_id, charged_ms=charged_ms)
        except Exception:  # the reservation stays charged: errs towards refusing, never over
            log.warning("entitlement.settle_failed job=%s", job_id, exc_info=True)

    @app.task(name=celeryconfig.INGEST_TASK, bind=True, acks_late=True, max_retries=None)
    def ingest(self: Task, *args: Any, **kwargs: Any) -> str:
        try:
            with plane.sessions() as session:
                return ingest_result(
                    session, _only_arg(args, kwargs), plane.keyring(), settle
                ).value
        except (OperationalError, InterfaceError) as e:
            delay = min(2 ** min(self.request.retries, 5), 30)
            log.warning("ingest.retry in=%ss error=%s", delay, str(e).splitlines()[0])
            raise self.retry(countdown=delay) from e

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

    def relay() -> None:
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

    @signals.worker_ready.connect(weak=False)
    def start_relay(sender: Any = None, **_: Any) -> None:
        threading.Thread(target=relay, name="outbox-relay", daemon=True).start()

    @signals.worker_shutdown.connect(weak=False)
    def stop_relay(sender: Any = None, **_: Any) -> None:
        stop.set()

    return app


def run_control(plane: ControlPlane, *, concurrency: int = 4, loglevel: str = "INFO") -> None:
    plane.check_database()
    plane.sync_keys()
    plane.policy  # noqa: B018 - load and record the policy version before serving
    app = build_control_app(plane, threading.Event())
    app.worker_main(
        [
            "worker",
            "-Q",
            celeryconfig.RESULTS_QUEUE,
            "-n",
            "control@%h",
            "--pool",
            "threads",
            "--concurrency",
            str(concurrency),
            "-E",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            loglevel,
        ]
    )
