"""The control's spans of a run: intake, decision, dispatch and ingest (docs/tracing.md).

Every span joins the trace of the run the control knows from its own records: the trace
derived from the run id (toolplane.tracecontext.run_trace), whose root is the intake span.
A decision or dispatch made later (after an approval, a result, by the sweeper) is a child
of that root; an ingest span is a child of the dispatch span of the envelope the control
signed for the attempt (from the node's record), never of the trace context a result
claims: a result that claims another trace is noted on the span (and in the log), not
followed. With tracing off, each of these is a no-op (no span, no traceparent).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

from toolplane.tracecontext import TraceContextError, Traceparent, parse_traceparent, run_trace
from toolplane.tracing import errors_by_type, forced_ids, tracer, tracing_on

log = logging.getLogger("toolplane.tracing")

__all__ = [
    "annotate",
    "current_traceparent",
    "intake_span",
    "record_ingest",
    "traced",
]

F = TypeVar("F", bound=Callable[..., Any])


def _context_of(ids: Traceparent) -> Context:
    parent = SpanContext(
        ids.trace_id_int, ids.span_id_int, is_remote=True, trace_flags=TraceFlags(1)
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _attributes(**values: Any) -> dict[str, Any]:
    return {f"toolplane.{k}": v for k, v in values.items() if v is not None}


@contextmanager
def intake_span(run_id: str, *, start_ns: int, **attributes: Any) -> Iterator[None]:
    """The root span of run ``run_id`` (ids derived from it), current inside."""
    if not tracing_on():
        yield
        return
    request = trace.get_current_span().get_span_context()  # the API's request span, if any
    with forced_ids(run_trace(run_id)):
        span = tracer().start_span(
            "toolplane.intake",
            context=Context(),  # no parent: the root of the run's trace
            attributes=_attributes(run_id=run_id, **attributes),
            links=[Link(request)] if request.is_valid else None,
            start_time=start_ns,
        )
    with (
        trace.use_span(
            span, end_on_exit=True, record_exception=False, set_status_on_exception=False
        ),
        errors_by_type(span),
    ):
        yield


def _parent(run_id: str) -> Context | None:
    """The current span if it is of this run's trace (a decision inside the intake, a
    dispatch inside its decision), else the run's root."""
    ids = run_trace(run_id)
    current = trace.get_current_span().get_span_context()
    return None if current.is_valid and current.trace_id == ids.trace_id_int else _context_of(ids)


def traced(stage: str) -> Callable[[F], F]:
    """Run the decorated step (called with ``run=`` and ``node=``) in a span of ``stage``
    in the run's trace; the node's status afterwards is on the span."""

    def wrap(step: F) -> F:
        @functools.wraps(step)
        def inner(*args: Any, run: Any, node: Any, **kwargs: Any) -> Any:
            if not tracing_on():
                return step(*args, run=run, node=node, **kwargs)
            with (
                tracer().start_as_current_span(
                    f"toolplane.{stage}",
                    context=_parent(run.id),
                    attributes=_attributes(
                        run_id=run.id,
                        node_id=node.node_id,
                        tool=node.tool,
                        attempt=node.attempt + 1,
                    ),
                    record_exception=False,
                    set_status_on_exception=False,
                ) as span,
                errors_by_type(span),
            ):
                done = step(*args, run=run, node=node, **kwargs)
                span.set_attribute("toolplane.node_status", str(node.status))
                return done

        return inner  # type: ignore[return-value]

    return wrap


def annotate(**values: Any) -> None:
    """Attributes on the current span (nothing with tracing off)."""
    if tracing_on():
        trace.get_current_span().set_attributes(_attributes(**values))


def current_traceparent() -> str | None:
    """The current span's W3C trace context (for the envelope), or None with tracing off."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return str(Traceparent(f"{context.trace_id:032x}", f"{context.span_id:016x}", True))


def record_ingest(
    *,
    run_id: str,
    node_id: str,
    attempt: int,
    tool: str,
    outcome: str,
    dispatched: str | None,
    claimed: str | None,
    start_ns: int,
    end_ns: int,
) -> None:
    """The ingest span of one verified, bound result, in run ``run_id``'s trace: a child of
    the dispatch span ``dispatched`` (the envelope's own traceparent, from the control's
    records) when it is of that trace, else of the run's root. ``claimed`` (the result's
    traceparent) is only linked when it is of the same trace."""
    if not tracing_on():
        return
    ids = run_trace(run_id)
    parent = _context_of(ids)
    known = _parsed(dispatched)
    if known is not None and known.trace_id == ids.trace_id:
        parent = _context_of(known)
    links = []
    other = _parsed(claimed)
    mismatch = claimed is not None and (other is None or other.trace_id != ids.trace_id)
    if other is not None and not mismatch:
        links.append(Link(SpanContext(other.trace_id_int, other.span_id_int, is_remote=True)))
    if mismatch:
        log.warning(
            "trace.claimed_mismatch run=%s node=%s attempt=%s claimed=%s (not followed)",
            run_id,
            node_id,
            attempt,
            claimed,
        )
    span = tracer().start_span(
        "toolplane.ingest",
        context=parent,
        links=links,
        attributes=_attributes(
            run_id=run_id,
            node_id=node_id,
            attempt=attempt,
            tool=tool,
            outcome=outcome,
            trace_claimed_mismatch=mismatch,
        ),
        start_time=start_ns,
    )
    span.end(end_time=max(end_ns, start_ns))


def _parsed(value: str | None) -> Traceparent | None:
    if value is None:
        return None
    try:
        return parse_traceparent(value)
    except TraceContextError:
        return None
