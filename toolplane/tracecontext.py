"""W3C trace context (``traceparent``) as it travels in envelopes and results (pure).

A run's trace is derived from its run id: the trace id and the span id of its root span
(the intake span) are the first 16 and the next 8 bytes of SHA-256 over
``toolplane.trace/<run id>``. Every control process (the API that took the run, the one
that ingests a result hours later, the sweeper that retries a node) so attaches its spans
to the run's one trace from the run id it holds in its own records, with no lookup and no
column to keep; a message's own trace context never chooses the trace. See docs/tracing.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = [
    "TRACEPARENT_PATTERN",
    "TraceContextError",
    "Traceparent",
    "check_traceparent",
    "parse_traceparent",
    "run_trace",
]

TRACEPARENT_PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$"
"""Version 00, lower-case hex ids, flags 00 or 01 (sampled): nothing else is accepted
(the all-zero ids, invalid in W3C trace context, are refused by :func:`check_traceparent`)."""

_RUN_SALT = b"toolplane.trace/"


class TraceContextError(ValueError):
    """A ``traceparent`` that is not a W3C trace context this project writes."""


@dataclass(frozen=True)
class Traceparent:
    """One W3C trace context: a trace id (32 hex), a span id (16 hex), the sampled flag."""

    trace_id: str
    span_id: str
    sampled: bool = True

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    @property
    def trace_id_int(self) -> int:
        return int(self.trace_id, 16)

    @property
    def span_id_int(self) -> int:
        return int(self.span_id, 16)


def parse_traceparent(value: str) -> Traceparent:
    """The trace context ``value`` names; :class:`TraceContextError` naming the rule if not."""
    if not isinstance(value, str) or len(value) != 55:
        raise TraceContextError("traceparent: 55 characters, 00-<32 hex>-<16 hex>-<2 hex>")
    version, trace_id, span_id, flags = (value[:2], value[3:35], value[36:52], value[53:])
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        raise TraceContextError("traceparent: fields are separated by '-'")
    hexdigits = set("0123456789abcdef")
    if version != "00":
        raise TraceContextError("traceparent: only version 00 is accepted")
    if not set(trace_id + span_id + flags) <= hexdigits:
        raise TraceContextError("traceparent: ids and flags are lower-case hex")
    if flags not in ("00", "01"):
        raise TraceContextError("traceparent: flags are 00 or 01")
    if trace_id == "0" * 32 or span_id == "0" * 16:
        raise TraceContextError("traceparent: an all-zero trace or span id is invalid")
    return Traceparent(trace_id, span_id, flags == "01")


def check_traceparent(value: str | None) -> str | None:
    """``value`` if it is None or a valid trace context (a pydantic field validator)."""
    if value is not None:
        parse_traceparent(value)
    return value


def run_trace(run_id: str) -> Traceparent:
    """The trace of run ``run_id`` and the span id of its root (intake) span."""
    h = hashlib.sha256(_RUN_SALT + run_id.encode("utf-8")).hexdigest()
    trace_id, span_id = h[:32], h[32:48]
    if trace_id == "0" * 32:  # 2**-128: never, but an invalid id must not be made
        trace_id = "0" * 31 + "1"
    if span_id == "0" * 16:
        span_id = "0" * 15 + "1"
    return Traceparent(trace_id, span_id, True)
