"""What the console's pages show, shaped from what the API's own functions return.

Pure functions over run views, evidence rows and verification reports: nothing here
reads the database or decides anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from control.orchestration.runs import NodeView, RunView
from ledger.verify import VerifyReport

__all__ = [
    "Box",
    "Graph",
    "Held",
    "actor_of",
    "graph_of",
    "held_calls",
    "policy_notes",
    "remaining",
    "shown",
    "timeline",
    "timings",
]

RESULT_CHARS = 4000  # a result longer than this is cut, its hash shown for the whole
ARGS_CHARS = 2000
BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 200, 64, 60, 24, 12


def shown(value: Any, limit: int = RESULT_CHARS) -> tuple[str, bool]:
    """A JSON value as indented text for a <pre>, cut at ``limit`` (and whether it was)."""
    if value is None:
        return "", False
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    return (text[:limit], True) if len(text) > limit else (text, False)


def remaining(expires_at: str, now: datetime | None = None) -> str:
    """How long until ``expires_at``: "42m 07s", or "expired"."""
    left = int((datetime.fromisoformat(expires_at) - (now or datetime.now(UTC))).total_seconds())
    if left <= 0:
        return "expired"
    hours, rest = divmod(left, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


_ID = re.compile(r'^\s*@id\("([^"]+)"\)')


def policy_notes(policies_text: str) -> dict[str, str]:
    """Each policy's reason as its author wrote it: the ``//`` comment above its ``@id``."""
    notes: dict[str, str] = {}
    comment: list[str] = []
    for line in policies_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            comment.append(stripped.lstrip("/").strip())
        elif (found := _ID.match(line)) is not None:
            notes[found.group(1)] = " ".join(c for c in comment if c)
        elif not stripped.startswith("@"):
            comment = []
    return notes


@dataclass(frozen=True)
class Held:
    """A call that waits for an approval, as the inbox shows it."""

    run: RunView
    node: NodeView
    args: str
    args_cut: bool
    policies: list[tuple[str, str]]  # (policy id, its reason)
    expires_at: str
    expires_in: str
    can_decide: bool
    rule: str  # why the viewer may not decide it ("" if they may)


def held_calls(
    runs: list[RunView], *, principal: str, approver: bool, role: str, notes: dict[str, str]
) -> list[Held]:
    """Every node awaiting a pending approval, the one that expires soonest first (for
    approvals of one policy TTL, the oldest request first), then by run."""
    held = []
    for run in runs:
        for node in run.nodes:
            approval = node.approval
            if node.status != "awaiting_approval" or not approval:
                continue
            if approval.get("status") != "pending":
                continue
            submitter = approval.get("requested_by") or run.submitter
            if submitter == principal:
                rule = (
                    f"You submitted this call: an approval must come from a principal "
                    f"with the approver role other than {submitter} (no self-approval)."
                )
            elif not approver:
                rule = f"Your role ({role}) cannot approve or reject calls: approvers only."
            else:
                rule = ""
            args, cut = shown(node.args, ARGS_CHARS)
            held.append(
                Held(
                    run=run,
                    node=node,
                    args=args,
                    args_cut=cut,
                    policies=[(p, notes.get(p, "")) for p in approval.get("policies") or []],
                    expires_at=approval["expires_at"],
                    expires_in=remaining(approval["expires_at"]),
                    can_decide=not rule,
                    rule=rule,
                )
            )
    return sorted(
        held, key=lambda h: (h.expires_at, h.run.created_at, h.run.run_id, h.node.node_id)
    )


@dataclass(frozen=True)
class Box:
    node_id: str
    tool: str
    status: str
    x: int
    y: int


@dataclass(frozen=True)
class Graph:
    width: int
    height: int
    boxes: list[Box]
    edges: list[tuple[int, int, int, int]] = field(default_factory=list)  # x1 y1 x2 y2


def graph_of(nodes: tuple[NodeView, ...]) -> Graph:
    """A left-to-right layered drawing: a node's column is its longest chain of needs."""
    by_id = {n.node_id: n for n in nodes}
    depth: dict[str, int] = {}

    def column(node_id: str, seen: frozenset[str] = frozenset()) -> int:
        if node_id not in depth:
            needs = [d for d in by_id[node_id].needs if d in by_id and d not in seen]
            depth[node_id] = 1 + max((column(d, seen | {node_id}) for d in needs), default=-1)
        return depth[node_id]

    rows: dict[int, int] = {}
    boxes: dict[str, Box] = {}
    for node in nodes:
        col = column(node.node_id)
        row = rows.get(col, 0)
        rows[col] = row + 1
        boxes[node.node_id] = Box(
            node.node_id,
            node.tool,
            node.status,
            PAD + col * (BOX_W + GAP_X),
            PAD + row * (BOX_H + GAP_Y),
        )
    edges = [
        (b.x + BOX_W, b.y + BOX_H // 2, boxes[n.node_id].x, boxes[n.node_id].y + BOX_H // 2)
        for n in nodes
        for need in n.needs
        if (b := boxes.get(need)) is not None
    ]
    cols = max(rows, default=0) + 1
    height = max(rows.values(), default=1)
    return Graph(
        width=2 * PAD + cols * BOX_W + (cols - 1) * GAP_X,
        height=2 * PAD + height * BOX_H + (height - 1) * GAP_Y,
        boxes=list(boxes.values()),
        edges=edges,
    )


def timings(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per node, from its evidence: when it was dispatched, started, finished, and the
    run time the worker reported (the last attempt's)."""
    out: dict[str, dict[str, Any]] = {}
    for event in events:
        payload = event["payload"] or {}
        node_id = payload.get("node_id")
        if not node_id:
            continue
        entry = out.setdefault(node_id, {})
        if event["kind"] == "ToolCallDispatched":
            entry["dispatched_at"] = event["created_at"]
        elif event["kind"] in ("ToolCallCompleted", "ToolCallFailed"):
            result = (payload.get("message") or {}).get("result") or {}
            for key in ("started_at", "finished_at"):
                if isinstance(result.get(key), int):
                    entry[key] = _instant(result[key])
            if isinstance(result.get("duration_ms"), int):
                entry["duration_ms"] = result["duration_ms"]
            entry["receipt_key_id"] = payload.get("receipt_key_id")
    return out


def _instant(epoch: int) -> str:
    """A worker's timestamp (Unix time in milliseconds) as ISO 8601 UTC."""
    return datetime.fromtimestamp(epoch / 1000, UTC).isoformat(timespec="milliseconds")


def actor_of(event: dict[str, Any]) -> str:
    """Who an event is from, as far as its payload says: a principal, a tool's key, or
    the control plane itself."""
    payload = event["payload"] or {}
    for key in ("by", "decided_by", "principal", "requested_by", "issued_by"):
        value = payload.get(key)
        if isinstance(value, str) and value:
            return value
    if payload.get("receipt_key_id"):
        return f"worker (key {payload['receipt_key_id']})"
    if event["kind"] == "PolicyDecision":
        return "policy engine"
    return "control"


def timeline(events: list[dict[str, Any]], report: VerifyReport | None) -> list[dict[str, Any]]:
    """The run's events in order, each with its actor and its verification outcome."""
    broken: dict[int, list[str]] = {}
    for b in report.broken if report is not None else []:
        if b.event_id is not None:
            broken.setdefault(b.event_id, []).append(b.problem)
    rows = []
    for event in events:
        problems = broken.get(event["id"], [])
        if report is None:
            outcome = "not verified"
        else:
            outcome = "broken" if problems else "verified"
        rows.append(
            {
                **event,
                "actor": actor_of(event),
                "node_id": (event["payload"] or {}).get("node_id"),
                "outcome": outcome,
                "problems": problems,
            }
        )
    return rows
