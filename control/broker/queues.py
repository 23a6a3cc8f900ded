"""Declaring the control's own queue before anyone publishes to it.

Workers publish results and manifests through the ``results`` exchange; on Redis, kombu
drops a message published to an exchange with no binding yet, without an error. So the
control's ``results`` queue (and its binding) is declared by whatever starts the plane,
before any worker can announce itself, and again by the control process itself.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

import celeryconfig

__all__ = ["declare_results_queue"]


def declare_results_queue(app: Celery) -> None:
    queue = Queue(
        celeryconfig.RESULTS_QUEUE,
        Exchange(celeryconfig.RESULTS_QUEUE, type="direct"),
        routing_key=celeryconfig.RESULTS_QUEUE,
    )
    with app.connection_for_write() as connection:
        queue(connection.default_channel).declare()
