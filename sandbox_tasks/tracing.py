"""A worker's spans of one job: queue wait, verify, sandbox run, receipt (docs/tracing.md).

They are children of the dispatch span whose trace context the control signed into the
envelope (``traceparent``), and only of an envelope whose signature verified: a job that
is refused before that gets no span. The result carries this worker's trace context back,
inside what its receipt signs; the control compares it with the envelope's and never lets
it choose a trace. The spans are exported by the worker's own (pool) process, whose
environment has the OTLP settings; a tool runs in a child with an empty environment and
records nothing. With tracing off, a JobTrace only carries the envelope's traceparent
over to the result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags

from toolplane.messages import Envelope
from toolplane.tracecontext import Traceparent, parse_traceparent
from toolplane.tracing import configure_tracing, errors_by_type, flush_tracing, tracer, tracing_on

__all__ = ["SERVICE", "JobTrace", "start_worker_tracing", "stop_worker_tracing"]

SERVICE = "toolplane-worker"


def start_worker_tracing(tool: str, env: Mapping[str, str] | None = None) -> bool:
    """In each pool process (after the fork): the exporter, if an endpoint is configured."""
    return configure_tracing(
        SERVICE, os.environ if env is None else env, **{"toolplane.tool": tool}
    )


def stop_worker_tracing() -> None:
    flush_tracing()


class JobTrace:
    """The trace context of one job, from the verified envelope on."""

    def __init__(self) -> None:
        self.received_ns = time.time_ns()
        self.envelope_traceparent: str | None = None
        self._parent: Any = None  # the dispatch span, as a remote parent context
        self._attributes: dict[str, Any] = {}
        self._worked: str | None = None  # this worker's span that the result names

    def verified(self, envelope: Envelope) -> None:
        """The envelope verified: record its queue wait (from its issue to this worker's
        receipt of it) and the verification, as children of its dispatch span."""
        self.envelope_traceparent = envelope.traceparent
        if envelope.traceparent is None or not tracing_on():
            return
        ids = parse_traceparent(envelope.traceparent)
        dispatch = SpanContext(
            ids.trace_id_int,
            ids.span_id_int,
            is_remote=True,
            trace_flags=TraceFlags(1 if ids.sampled else 0),
        )
        self._parent = trace.set_span_in_context(NonRecordingSpan(dispatch))
        self._attributes = {
            "toolplane.run_id": envelope.run_id,
            "toolplane.node_id": envelope.node_id,
            "toolplane.attempt": envelope.attempt,
            "toolplane.tool": envelope.tool,
            "toolplane.job_id": envelope.job_id,
        }
        issued_ns = envelope.issued_at * 1_000_000
        self.record("queue_wait", issued_ns, max(self.received_ns, issued_ns))
        self._worked = _traceparent_of(self.record("verify", self.received_ns, time.time_ns()))

    def record(self, stage: str, start_ns: int, end_ns: int, **attributes: Any) -> Span | None:
        """A span of ``stage`` with explicit start and end times (None if not traced)."""
        if self._parent is None:
            return None
        span = tracer().start_span(
            f"toolplane.{stage}",
            context=self._parent,
            attributes=self._attributes | attributes,
            start_time=start_ns,
        )
        span.end(end_time=end_ns)
        return span

    @contextmanager
    def span(self, stage: str, **attributes: Any) -> Iterator[None]:
        """A span of ``stage`` around the block (nothing if not traced)."""
        if self._parent is None:
            yield
            return
        with (
            tracer().start_as_current_span(
                f"toolplane.{stage}",
                context=self._parent,
                attributes=self._attributes | attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            errors_by_type(span),
        ):
            if stage == "sandbox_run":
                self._worked = _traceparent_of(span)
            yield

    @property
    def traceparent(self) -> str | None:
        """What the result carries: this worker's span (its sandbox run, else its
        verification), or the envelope's own when this worker records none."""
        return self._worked or self.envelope_traceparent


def _traceparent_of(span: Span | None) -> str | None:
    context = span.get_span_context() if span is not None else None
    if context is None or not context.is_valid:
        return None
    return str(Traceparent(f"{context.trace_id:032x}", f"{context.span_id:016x}", True))
