"""What the control's metrics say about state, read when scraped, never kept in memory.

The gauges (approvals pending, outbox backlog, ingest lag, queue depths) come from a few
bounded queries at scrape time: one grouped count per table with an index, one passive
declare per queue, and the oldest message of ``results``. ``render`` adds them to the
counters that every control process wrote to the multiprocess directory.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import func, select

import celeryconfig
from control.ops.runtime import ControlPlane
from ledger.models import Approval, OutboxMessage, ToolApproval, ToolManifest

log = logging.getLogger("toolplane.metrics")

__all__ = ["CONTENT_TYPE", "StateCollector", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_TOOLS = 200  # queues looked at per scrape, at most


class StateCollector:
    """A prometheus_client collector of the control's state gauges."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        pending = GaugeMetricFamily(
            "toolplane_approvals_pending", "Approvals waiting for a decision", labels=["tenant"]
        )
        backlog = GaugeMetricFamily(
            "toolplane_outbox_backlog", "Jobs committed but not yet published"
        )
        depth = GaugeMetricFamily(
            "toolplane_queue_depth", "Messages waiting per queue", labels=["queue"]
        )
        lag = GaugeMetricFamily(
            "toolplane_ingest_lag_seconds", "Age of the oldest result waiting in results"
        )
        with self.plane.engine.connect() as connection:
            rows = connection.execute(
                select(Approval.tenant_id, func.count())
                .where(Approval.status == "pending")
                .group_by(Approval.tenant_id)
            ).all()
            for tenant, count in bounded_tenants(rows, self.plane.settings.metrics_tenant_labels):
                pending.add_metric([tenant], count)
            backlog.add_metric(
                [],
                connection.scalar(
                    select(func.count())
                    .select_from(OutboxMessage)
                    .where(OutboxMessage.published_at.is_(None))
                )
                or 0,
            )
            registered = select(ToolManifest.tool).union(select(ToolApproval.tool))
            tools = sorted(connection.scalars(registered.limit(MAX_TOOLS)))
        yield pending
        yield backlog
        try:
            queues = [celeryconfig.tool_queue(t) for t in tools] + [celeryconfig.RESULTS_QUEUE]
            with self.plane.celery.connection_for_read() as connection:
                channel = connection.default_channel
                for queue in queues:
                    depth.add_metric([queue], _size(channel, queue))
                lag.add_metric([], oldest_result_age(channel))
        except Exception:  # the broker is down: the gauges are absent, the scrape answers
            log.warning("metrics.broker_unreachable", exc_info=True)
            return
        yield depth
        yield lag


def bounded_tenants(rows: Iterable[Any], limit: int) -> list[tuple[str, int]]:
    """The ``limit`` tenants with the most, by id; the rest summed as ``other``."""
    ranked = sorted(((str(t), int(c)) for t, c in rows), key=lambda r: (-r[1], r[0]))
    named, rest = ranked[:limit], ranked[limit:]
    return named + ([("other", sum(c for _, c in rest))] if rest else [])


def _size(channel: Any, queue: str) -> int:
    try:
        return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except Exception as e:  # Redis: an empty queue has no key (NOT_FOUND)
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return 0
        raise


def oldest_result_age(channel: Any, now: float | None = None) -> float:
    """Seconds since the oldest result waiting in ``results`` finished (by the time its
    worker wrote in it); 0 when none waits or the broker is not Redis."""
    client = getattr(channel, "client", None)
    if client is None:
        return 0.0
    raw = client.lindex(celeryconfig.RESULTS_QUEUE, -1)  # kombu pushes left, pops right
    finished = finished_at_ms(raw) if raw is not None else None
    if finished is None:
        return 0.0
    return max((now if now is not None else time.time()) - finished / 1000, 0.0)


def finished_at_ms(raw: bytes) -> int | None:
    """A queued result message's ``result.finished_at`` (ms), if it has one."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        finished = args[0]["result"]["finished_at"]
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        return None
    return finished if type(finished) is int else None


def render(plane: ControlPlane) -> bytes:
    """The control's metrics in the Prometheus text format: every control process's
    counters (the multiprocess directory) and the state gauges, read now."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    if MULTIPROC_ENV in os.environ:
        multiprocess.MultiProcessCollector(registry)
    else:  # no directory could be written (control.ops.metrics.install): this process's
        registry.register(_Counted(REGISTRY))
    registry.register(StateCollector(plane))
    return generate_latest(registry)


class _Counted:
    """The counters of this process's own registry (where no multiprocess directory is)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        return iter(self.registry.collect())
