"""Tracing in the control's processes: on when an OTLP endpoint is configured.

Called by each composition root of the control (the API's app, the control process with
its results ingest and sweeper); idempotent. With no endpoint, nothing is installed and
the spans of control.orchestration.spans are no-ops. docs/tracing.md.
"""

from __future__ import annotations

import os

from toolplane.tracing import configure_tracing

__all__ = ["SERVICE", "start_control_tracing"]

SERVICE = "toolplane-control"


def start_control_tracing() -> bool:
    """Install the exporter if this process's environment names an endpoint; whether on."""
    return configure_tracing(SERVICE, os.environ)
