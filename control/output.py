"""How the CLI shows things: JSON for machines, one line per fact for people."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from control.runs import NodeView, RunView

__all__ = ["console", "err", "print_json", "print_run", "summarize"]

console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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
        console.print(f"  {node.node_id}: {node.status} — {summarize(node)}")
        console.print(f"    receipt {key}", style="dim")


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
