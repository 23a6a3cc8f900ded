"""Tracing setup shared by both planes: OpenTelemetry over OTLP/HTTP, or nothing at all.

Tracing is on in a process only when an endpoint is configured, by
``TOOLPLANE_OTLP_ENDPOINT`` (the collector's base URL; ``/v1/traces`` is appended) or
the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``,
and ``OTEL_SDK_DISABLED`` is not true. Otherwise the OpenTelemetry SDK is not even
imported: the API's no-op tracer records nothing and no exporter thread runs.

Each process's composition root calls :func:`configure_tracing` once (the control's
processes at start, a worker in each pool process after the fork, so that the
exporter's thread lives in the process that records). docs/tracing.md.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

from toolplane.tracecontext import Traceparent

log = logging.getLogger("toolplane.tracing")

__all__ = [
    "ENDPOINT_SETTINGS",
    "WORKER_TRACE_SETTINGS",
    "configure_tracing",
    "errors_by_type",
    "flush_tracing",
    "forced_ids",
    "otlp_endpoint",
    "trace_env",
    "tracer",
    "tracing_on",
]

ENDPOINT_SETTINGS = (
    "TOOLPLANE_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
WORKER_TRACE_SETTINGS = ENDPOINT_SETTINGS + tuple(
    "OTEL_SDK_DISABLED OTEL_RESOURCE_ATTRIBUTES OTEL_BSP_SCHEDULE_DELAY "
    "OTEL_BSP_MAX_QUEUE_SIZE OTEL_BSP_MAX_EXPORT_BATCH_SIZE OTEL_BSP_EXPORT_TIMEOUT "
    "OTEL_EXPORTER_OTLP_HEADERS OTEL_EXPORTER_OTLP_TRACES_HEADERS "
    "OTEL_EXPORTER_OTLP_TIMEOUT OTEL_EXPORTER_OTLP_TRACES_TIMEOUT "
    "OTEL_EXPORTER_OTLP_COMPRESSION OTEL_EXPORTER_OTLP_TRACES_COMPRESSION "
    "OTEL_EXPORTER_OTLP_CERTIFICATE OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE "
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE OTEL_EXPORTER_OTLP_CLIENT_KEY".split()
)
"""What a worker's environment takes from the control's (control.ops.processes): the
worker's own process exports its spans; the tools it runs get an empty environment."""

_FORCED: contextvars.ContextVar[Traceparent | None] = contextvars.ContextVar(
    "toolplane_forced_trace_ids", default=None
)
_state: dict[str, Any] = {}  # the provider this process installed, once


def otlp_endpoint(env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL ``env`` configures, or None (tracing off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if base := env.get("TOOLPLANE_OTLP_ENDPOINT", "").strip():
        return base.rstrip("/") + "/v1/traces"
    if full := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return full
    if base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return base.rstrip("/") + "/v1/traces"
    return None


def trace_env(source: Mapping[str, str]) -> dict[str, str]:
    """The tracing settings of ``source`` that a worker process gets."""
    return {k: v for k, v in source.items() if k in WORKER_TRACE_SETTINGS}


class _RunIdGenerator:
    """The SDK's random ids, except for the one span opened under :func:`forced_ids`."""

    def generate_span_id(self) -> int:
        forced = _FORCED.get()
        return forced.span_id_int if forced is not None else random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        forced = _FORCED.get()
        return forced.trace_id_int if forced is not None else random.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:  # W3C level 2's flag: not for a derived id
        return _FORCED.get() is None


@contextmanager
def forced_ids(ids: Traceparent) -> Iterator[None]:
    """Spans started inside (with no parent) get exactly these trace and span ids: the root
    span of a run, whose ids every process derives from the run id."""
    token = _FORCED.set(ids)
    try:
        yield
    finally:
        _FORCED.reset(token)


def configure_tracing(service: str, env: Mapping[str, str], **attributes: str) -> bool:
    """Install the SDK's tracer provider with an OTLP/HTTP exporter if ``env`` configures
    an endpoint (once per process); whether tracing is on."""
    if "provider" in _state:
        return True
    endpoint = otlp_endpoint(env)
    if endpoint is None:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": service, **attributes})
    provider = TracerProvider(resource=resource, id_generator=_RunIdGenerator())  # type: ignore[arg-type]
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    _state["provider"] = provider
    atexit.register(flush_tracing)
    log.info("tracing.on service=%s endpoint=%s", service, endpoint)
    return True


def tracing_on() -> bool:
    return "provider" in _state


def flush_tracing(timeout_ms: int = 5000) -> None:
    """Export what is recorded (a worker's pool process before it exits)."""
    provider = _state.get("provider")
    if provider is not None:
        try:
            provider.force_flush(timeout_ms)
        except Exception:  # a hook: an unreachable collector never stops a shutdown
            log.warning("tracing.flush_failed", exc_info=True)


def tracer() -> trace.Tracer:
    return trace.get_tracer("toolplane")


@contextmanager
def errors_by_type(span: trace.Span) -> Iterator[None]:
    """An exception leaving the block marks ``span`` failed with the exception's type only.

    Our spans are started with ``record_exception=False``: an exception's message (a
    statement's parameters, a tool's arguments) and its traceback never reach the
    collector, which is outside the control's trust boundary; the logs keep them, masked."""
    try:
        yield
    except BaseException as e:
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(e).__name__))
        raise
