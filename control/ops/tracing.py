"""Tracing in the control's processes: on when an OTLP endpoint is configured.

Called by each composition root of the control (the API's app, the control process with
its results ingest and sweeper); idempotent. With no endpoint, nothing is installed and
the spans of control.orchestration.spans are no-ops. docs/tracing.md.

With tracing on, no trace context that a caller sends is followed: the global propagator
extracts nothing, so an HTTP request's ``traceparent`` (or ``baggage``) header cannot make
the API's spans of that request children of a trace the caller names (a run's trace is
derived from its id, so anyone who learns the id could name it). The API's request spans
are traces of their own; a run's intake span links to the one that submitted it.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator

from toolplane.tracing import configure_tracing

__all__ = ["SERVICE", "NoCallerContext", "start_control_tracing"]

SERVICE = "toolplane-control"


class NoCallerContext(TextMapPropagator):
    """The control's propagator: extracts nothing from a carrier (the context stays as it
    was), injects nothing."""

    def extract(self, carrier: Any, context: Context | None = None, getter: Any = None) -> Context:
        return context if context is not None else Context()

    def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
        return None

    @property
    def fields(self) -> set[str]:
        return set()


def start_control_tracing() -> bool:
    """Install the exporter if this process's environment names an endpoint; whether on."""
    on = configure_tracing(SERVICE, os.environ)
    if on:
        propagate.set_global_textmap(NoCallerContext())  # callers choose no trace
    return on
