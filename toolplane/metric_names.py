"""The names of toolplane's Prometheus metrics (issue 19's catalog), for the checks of what
refers to them (the dashboard and alert rules under docker/observability/).

Each name, its type and its labels. The code that exports the metrics is the source of
truth once it exists; this list must then name the same metrics (or be built from it).
"""

from __future__ import annotations

__all__ = ["CONTROL", "METRICS", "WORKER"]

CONTROL: dict[str, tuple[str, tuple[str, ...]]] = {
    "toolplane_decisions_total": ("counter", ("tool", "effect")),
    "toolplane_denials_total": ("counter", ("tool", "reason")),
    "toolplane_approvals_pending": ("gauge", ("tenant",)),
    "toolplane_approvals_decided_total": ("counter", ("outcome",)),
    "toolplane_runs_finished_total": ("counter", ("status",)),
    "toolplane_call_duration_seconds": ("histogram", ("tool",)),
    "toolplane_queue_wait_seconds": ("histogram", ("tool",)),
    "toolplane_tool_duration_seconds": ("histogram", ("tool",)),
    "toolplane_receipts_total": ("counter", ("tool", "outcome")),
    "toolplane_results_ignored_total": ("counter", ("tool",)),
    "toolplane_ingest_lag_seconds": ("gauge", ()),
    "toolplane_outbox_backlog": ("gauge", ()),
    "toolplane_entitlement_refusals_total": ("counter", ("limit",)),
    "toolplane_queue_depth": ("gauge", ("queue",)),
    "toolplane_sandbox_kills_total": ("counter", ("tool", "limit")),
}

WORKER: dict[str, tuple[str, tuple[str, ...]]] = {
    "toolplane_worker_jobs_total": ("counter", ("tool", "outcome")),
    "toolplane_worker_refusals_total": ("counter", ("tool", "code")),
    "toolplane_worker_sandbox_kills_total": ("counter", ("tool", "limit")),
    "toolplane_worker_tool_seconds": ("histogram", ("tool",)),
    "toolplane_worker_up": ("gauge", ("tool",)),
}

METRICS = {**CONTROL, **WORKER}
