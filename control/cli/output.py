"""How the CLI shows things: JSON for machines, one line per fact for people."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from control.api.models import NodeOut as NodeView
from control.api.models import RunOut as RunView

__all__ = [
    "console",
    "err",
    "print_awaiting",
    "print_json",
    "print_run",
    "print_runs",
    "safe",
    "summarize",
    "waiting_line",
]

console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def safe(text: object) -> str:
    """Text for a terminal: control characters (ESC and the like) shown escaped, never sent.

    Results, error messages, arguments and reasons come from tools and people;
    a terminal must not interpret what they contain."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def summarize(node: NodeView) -> str:
    """A one-line summary of a node's result or error."""
    if node.error:
        return f"{node.error.get('code')}: {node.error.get('message')}"
    result = node.result or {}
    if "hits" in result:
        hits = result["hits"]
        top = f", top: {hits[0]['title']!r} ({hits[0]['path']})" if hits else ""
        return f"{len(hits)} hits for {result.get('query', '')!r}{top}"
    if "findings" in result:
        codes = sorted({f["code"] for f in result["findings"]})
        count = result.get("count", len(result["findings"]))
        return f"{count} findings ({', '.join(codes) or 'none'})"
    if "content" in result:
        return (
            f"{result.get('path')}: {result.get('size')} bytes, {result.get('lines')} lines, "
            f"sha256 {str(result.get('sha256', ''))[:16]}…"
        )
    return ", ".join(sorted(result)) or "(empty result)"


def print_run(view: RunView) -> None:
    console.print(
        f"run {view.run_id}  [bold]{view.status}[/bold]  ({view.tenant}, {view.workflow})"
    )
    for node in view.nodes:
        key = (node.receipt or {}).get("key_id", "-")
        if node.status == "awaiting_approval" and node.approval:
            line = (
                f"  {node.node_id}: awaiting_approval — {waiting_line(node.approval)}; "
                f"policies: {', '.join(node.approval['policies'])}"
            )
            console.print(safe(line), markup=False)
            continue
        console.print(safe(f"  {node.node_id}: {node.status} — {summarize(node)}"), markup=False)
        if node.approval and node.approval["status"] == "granted":
            console.print(
                safe(
                    f"    approved by {node.approval['decided_by']}"
                    f" ({node.approval['approval_id']})"
                ),
                style="dim",
                markup=False,
            )
        console.print(f"    receipt {key}", style="dim", markup=False)


def waiting_line(approval: dict[str, Any]) -> str:
    """For whom a call waits, in words."""
    return (
        f"waits for a principal with the approver role other than {approval['requested_by']}"
        f" (approval {approval['approval_id']}, expires {approval['expires_at'][:19]}Z)"
    )


def print_awaiting(views: list[RunView]) -> None:
    """Runs waiting for approval: what each call would do, who asked, and until when."""
    lines = 0
    for view in views:
        for node in view.nodes:
            if node.status != "awaiting_approval" or not node.approval:
                continue
            lines += 1
            console.print(
                safe(
                    f"{view.run_id} {node.node_id}: {node.tool} "
                    f"{json.dumps(node.args, sort_keys=True)[:200]}"
                ),
                markup=False,
            )
            console.print(
                safe(
                    f"    submitted by {node.approval['requested_by']}"
                    + (f" for {view.on_behalf_of}" if view.on_behalf_of else "")
                    + f" in {view.environment}/{view.classification}; "
                    f"policies: {', '.join(node.approval['policies'])}; "
                    f"expires {node.approval['expires_at'][:19]}Z"
                ),
                markup=False,
            )
    if not lines:
        console.print("no call waits for an approval")


def print_runs(views: list[RunView]) -> None:
    table = Table("run", "status", "workflow", "tools", "created")
    for view in views:
        table.add_row(
            view.run_id,
            view.status,
            view.workflow,
            ", ".join(n.tool for n in view.nodes),
            view.created_at[:19],
        )
    console.print(table)
