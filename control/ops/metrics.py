"""The control's counters and histograms, counted from the evidence each transaction commits.

One place observes every control process: after a session commits, the evidence events
it appended (``ledger.store`` keeps them in ``session.info``, in the list this module puts
there when each transaction begins) are turned into counts, so
a count is never ahead of, nor behind, the ledger; a rolled-back transaction counts
nothing. The API processes and the control daemon each write their own files in one
directory (prometheus_client's multiprocess mode), and one scrape of the API sums them.
With ``TOOLPLANE_METRICS=off`` nothing is installed: no hook, no directory, no counting.

The directory is ``$TOOLPLANE_HOME/run/metrics`` unless ``PROMETHEUS_MULTIPROC_DIR`` is
set; the supervisor (``control.ops.processes``) empties it when it starts a stack whose
control processes all stopped. ``install`` must run before anything imports
prometheus_client: the library picks its multiprocess mode at import.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ledger.models import ToolApproval, ToolManifest
from ledger.store import APPENDED

log = logging.getLogger("toolplane.metrics")

__all__ = [
    "NODES",
    "ControlMetrics",
    "ToolNames",
    "install",
    "metrics_dir",
    "note_node",
    "reset_metrics_dir",
]

ENV = "PROMETHEUS_MULTIPROC_DIR"
NODES = "toolplane.nodes"  # session.info: (run id, node id) -> (tool, created, dispatched)
OTHER = "other"
EFFECTS = {"allow": "allow", "deny": "deny", "approval_required": "hold"}
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RUN_ENDS = {"RunCompleted": "completed", "RunCancelled": "cancelled", "RunFailed": None}
_installed: list[ControlMetrics] = []
_lock = threading.Lock()


def metrics_dir(home: Path) -> Path:
    return home / "run" / "metrics"


def reset_metrics_dir(home: Path) -> None:
    """Empty the stack's metrics directory (at a fresh start: counters begin at zero)."""
    path = Path(os.environ.get(ENV) or metrics_dir(home))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def note_node(session: Session, node: Any, dispatched_at: datetime | None = None) -> None:
    """What a node's events do not carry (its tool, when it was created and dispatched),
    for the counts made after this session commits (where they are counted)."""
    if session.info.get(APPENDED) is None:
        return
    session.info.setdefault(NODES, {})[(node.run_id, node.node_id)] = (
        node.tool,
        node.created_at,
        dispatched_at,
    )


class ToolNames:
    """The registered tools (approved by the operator, ``tool_approvals``, or in force,
    ``tool_manifests``): a tool label is one of them or ``other``. Re-read at most every
    ``ttl_s``; an unknown name re-reads at most once a second."""

    def __init__(self, engine: Engine, *, ttl_s: float = 60.0) -> None:
        self.engine = engine
        self.ttl_s = ttl_s
        self._names: frozenset[str] = frozenset()
        self._read_at = -1e9

    def _refresh(self) -> None:
        self._read_at = time.monotonic()
        try:
            with self.engine.connect() as connection:
                approved = select(ToolApproval.tool)
                found = connection.scalars(select(ToolManifest.tool).union(approved))
                self._names = frozenset(found)
        except Exception:  # a label must never fail a commit's observer
            log.warning("metrics.tools_unreadable", exc_info=True)

    def label(self, name: Any) -> str:
        if not isinstance(name, str) or not name:
            return OTHER
        age = time.monotonic() - self._read_at
        if age > self.ttl_s or (name not in self._names and age > 1.0):
            self._refresh()
        return name if name in self._names else OTHER


class ControlMetrics:
    """The control's metrics (METRICS in docs/observability.md), built once per process."""

    def __init__(self, tools: Callable[[Any], str]) -> None:
        from prometheus_client import Counter, Histogram

        self.tool = tools
        p = "toolplane_"
        self.decisions = Counter(p + "decisions", "Policy decisions", ["tool", "effect"])
        self.denials = Counter(p + "denials", "Calls denied, by why", ["tool", "reason"])
        self.approvals = Counter(p + "approvals_decided", "Approvals decided", ["outcome"])
        self.runs = Counter(p + "runs_finished", "Runs that ended", ["status"])
        self.receipts = Counter(p + "receipts", "Receipts checked", ["tool", "outcome"])
        self.ignored = Counter(p + "results_ignored", "Verified results not taken", ["tool"])
        self.refusals = Counter(
            p + "entitlement_refusals", "Calls refused by an entitlement", ["limit"]
        )
        self.kills = Counter(p + "sandbox_kills", "Calls cut off by a limit", ["tool", "limit"])
        self.call = Histogram(
            p + "call_duration_seconds",
            "Submitted (node created) to result accepted",
            ["tool"],
            buckets=DURATION_BUCKETS,
        )
        self.wait = Histogram(
            p + "queue_wait_seconds",
            "Dispatched to the worker's start",
            ["tool"],
            buckets=DURATION_BUCKETS,
        )
        self.tool_seconds = Histogram(
            p + "tool_duration_seconds",
            "The tool's own run time",
            ["tool"],
            buckets=DURATION_BUCKETS,
        )

    def observe(self, events: Iterable[tuple[Any, datetime]], nodes: dict[Any, Any]) -> None:
        for new, at in events:
            try:
                self._one(new.kind, new.run_id, new.payload, at, nodes)
            except Exception:  # counting must never break what committed
                log.warning("metrics.observe_failed kind=%s", new.kind, exc_info=True)

    def _one(
        self, kind: str, run_id: Any, payload: dict[str, Any], at: datetime, nodes: Any
    ) -> None:
        node = nodes.get((run_id, payload.get("node_id")))

        def tool() -> str:  # the node's, else the one the event names
            return self.tool(node[0] if node else payload.get("tool"))

        if kind == "PolicyDecision":
            effect = EFFECTS.get(str(payload.get("decision")), "deny")
            self.decisions.labels(
                self.tool((payload.get("request") or {}).get("tool")), effect
            ).inc()
        elif kind == "ToolDenied":
            self.denials.labels(tool(), "policy").inc()
        elif kind == "EntitlementDenied":
            self.denials.labels(tool(), "entitlement").inc()
            self.refusals.labels(str(payload.get("limit") or OTHER)[:40]).inc()
        elif kind in ("ApprovalRejected", "ApprovalExpired"):
            outcome = "expired" if kind == "ApprovalExpired" else "rejected"
            self.approvals.labels(outcome).inc()
            self.denials.labels(tool(), f"approval_{outcome}").inc()
        elif kind == "ApprovalGranted":
            self.approvals.labels("granted").inc()
        elif kind in RUN_ENDS:
            self.runs.labels(RUN_ENDS[kind] or str(payload.get("status"))[:20]).inc()
            if (payload.get("error") or {}).get("code") == "invalid_argument":
                self.denials.labels(tool(), "invalid").inc()  # refused before any dispatch
        elif kind == "ToolReceiptInvalid":
            self.receipts.labels(
                self.tool((payload.get("claimed") or {}).get("tool")), "refused"
            ).inc()
        elif kind in ("ToolCallCompleted", "ToolCallFailed", "JobRefused", "ResultIgnored"):
            result = ((payload.get("message") or {}).get("result")) or {}
            name = self.tool(node[0] if node else result.get("tool"))
            self.receipts.labels(name, "verified").inc()
            if kind == "ResultIgnored":
                self.ignored.labels(name).inc()
            elif kind != "JobRefused":
                self._call(name, result, node, at)

    def _call(self, tool: str, result: dict[str, Any], node: Any, at: datetime) -> None:
        from sandbox_tasks.metrics import kill_limit

        if isinstance(result.get("duration_ms"), int):
            self.tool_seconds.labels(tool).observe(max(result["duration_ms"], 0) / 1000)
        if node is not None and node[1] is not None:
            self.call.labels(tool).observe(max((at - node[1]).total_seconds(), 0.0))
        started = result.get("started_at")
        if node is not None and node[2] is not None and isinstance(started, int):
            self.wait.labels(tool).observe(max(started / 1000 - node[2].timestamp(), 0.0))
        error = result.get("error") or {}
        limit = kill_limit(str(error.get("code")), str(error.get("message")))
        if limit is not None:
            self.kills.labels(tool, limit).inc()


def install(home: Path, engine: Engine, *, on: bool = True) -> ControlMetrics | None:
    """This process's metrics (once): the multiprocess directory, then the observer of
    every session's commits. Off (``TOOLPLANE_METRICS=off``): neither, and None."""
    if not on:
        log.info("metrics.off")
        return None
    with _lock:
        if _installed:
            return _installed[0]
        os.environ.setdefault(ENV, str(metrics_dir(home)))
        try:
            Path(os.environ[ENV]).mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:  # a read-only HOME: this process counts alone, in a temp dir
            try:
                os.environ[ENV] = tempfile.mkdtemp(prefix="toolplane-metrics-")
            except OSError:  # nowhere to write: in this process's memory only
                del os.environ[ENV]
            log.warning("metrics.dir_unwritable error=%s using=%s", e, os.environ.get(ENV))
        metrics = ControlMetrics(ToolNames(engine).label)

        def committed(session: Session) -> None:
            appended = session.info.pop(APPENDED, None)
            nodes = session.info.pop(NODES, None) or {}
            if appended:
                metrics.observe(appended, nodes)

        def began(session: Session, *_: Any) -> None:
            session.info.setdefault(APPENDED, [])  # ledger.store keeps the appends here

        def rolled_back(session: Session, *_: Any) -> None:
            session.info.pop(APPENDED, None)
            session.info.pop(NODES, None)

        event.listen(Session, "after_begin", began)
        event.listen(Session, "after_commit", committed)
        event.listen(Session, "after_soft_rollback", rolled_back)
        _installed.append(metrics)
        return metrics
