"""``make demo``: the main job on a fresh machine, through the real CLI.

Starts everything (embedded Redis and PostgreSQL unless TOOLPLANE_BROKER_URL and
TOOLPLANE_DATABASE_URL are set), creates a demo tenant, calls each built-in tool
once on the sample data in examples/, runs the ``repo-review`` workflow (two
nodes in parallel, then one that needs both), shows an approval, verifies the
ledger, and stops everything it started. Exits 0 only if every call and every
node completed and verification passed.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from control.api.models import NodeOut
from control.cli.output import console, err, summarize
from control.client import Client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_cli(
    *args: str, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "control.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    if check and done.returncode != 0:
        raise RuntimeError(
            f"toolplane {' '.join(args[:2])} exited {done.returncode}: {done.stderr.strip()}"
        )
    return done


def node_of(run: dict[str, Any]) -> NodeOut:
    return view_of(run["nodes"][0])


def view_of(n: dict[str, Any]) -> NodeOut:
    return NodeOut.model_validate(n)


def main() -> int:
    env = dict(os.environ)
    env.setdefault("TOOLPLANE_REPO_ROOT", str(EXAMPLES / "repo"))
    env.setdefault("TOOLPLANE_DOCS_ROOT", str(EXAMPLES / "docs"))
    env.setdefault("TOOLPLANE_HOME", str(ROOT / ".toolplane"))
    env.setdefault("TOOLPLANE_URL", "http://" + env.get("TOOLPLANE_API_BIND", "127.0.0.1:8765"))
    started = time.monotonic()
    console.print(
        "[bold]toolplane demo[/bold]: starting the control process and one worker per tool…"
    )
    up = run_cli("up", "--detach", env=env, check=False)
    if up.returncode != 0:
        err.print(
            f"demo: toolplane up failed: {up.stderr.strip() or up.stdout.strip()}", markup=False
        )
        run_cli("down", env=env, check=False)
        return 1
    console.print(up.stdout.strip(), markup=False)
    ok = True
    try:
        tenant = f"demo-{secrets.token_hex(3)}"
        created = json.loads(run_cli("tenant", "create", tenant, "--json", env=env).stdout)
        env["TOOLPLANE_TOKEN"] = created["token"]
        console.print(f"tenant {tenant} created (admin token in TOOLPLANE_TOKEN for this demo)")
        code = (EXAMPLES / "repo" / "src" / "shipit" / "deploy.py").read_text()
        calls = [
            ("search_docs", ["--arg", "query=signed receipts for tool results"]),
            ("read_repo_file", ["--arg", "path=src/shipit/deploy.py"]),
            ("lint_python", ["--arg", f"code={code}"]),
        ]
        for tool, args in calls:
            done = run_cli("call", tool, *args, "--wait", "--json", env=env, check=False)
            if done.returncode not in (0, 4) or not done.stdout.strip():
                err.print(f"  {tool}: exit {done.returncode}: {done.stderr.strip()}", markup=False)
                ok = False
                continue
            run = json.loads(done.stdout)
            node = node_of(run)
            key = (node.receipt or {}).get("key_id", "-")
            mark = "[green]✓[/green]" if node.status == "completed" else "[red]✗[/red]"
            console.print(f"  {mark} {tool:<15} {node.status:<10} {summarize(node)}")
            console.print(f"      run {run['run_id']}  receipt {key}", style="dim")
            ok = ok and run["status"] == "completed"
        ok = workflow_run(env) and ok
        ok = approval_flow(env) and ok
        verify = run_cli("ledger", "verify", "--json", env=env, check=False)
        report = json.loads(verify.stdout) if verify.stdout.strip() else {"ok": False, "broken": []}
        verdict = "[green]ok[/green]" if report["ok"] else "[red]BROKEN[/red]"
        console.print(
            f"ledger verify: {verdict} — {report.get('events')} events, "
            f"{report.get('receipts_verified')} receipts verified"
        )
        ok = ok and verify.returncode == 0 and report["ok"]
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        err.print(f"demo: {e}", markup=False)
        ok = False
    finally:
        down = run_cli("down", env=env, check=False)
        console.print(down.stdout.strip(), markup=False)
    verdict = "[green]passed[/green]" if ok else "[red]FAILED[/red]"
    console.print(f"demo {verdict} in {time.monotonic() - started:.1f}s")
    return 0 if ok else 1


def workflow_run(env: dict[str, str]) -> bool:
    """repo-review: search the docs and read a file at once, then lint what was read."""
    console.print(
        "[bold]workflow[/bold] repo-review: search_docs and read_repo_file in parallel, "
        "then lint_python on the file read"
    )
    done = run_cli(
        "submit",
        "repo-review",
        "--input",
        "query=signed receipts for tool results",
        "--input",
        "path=src/shipit/deploy.py",
        "--wait",
        "--json",
        env=env,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        err.print(f"  repo-review: exit {done.returncode}: {done.stderr.strip()}", markup=False)
        return False
    run = json.loads(done.stdout)
    nodes = [view_of(n) for n in run["nodes"]]
    for node in nodes:
        mark = "[green]✓[/green]" if node.status == "completed" else "[red]✗[/red]"
        after = f"; after {', '.join(node.needs)}" if node.needs else ""
        console.print(
            f"  {mark} {node.node_id:<6} {node.tool:<15} {node.status:<10} {summarize(node)}{after}"
        )
    # `submit --wait` reports each node's status changes on stderr, in the order seen
    progress = [line.strip() for line in done.stderr.splitlines() if line.startswith("  ")]
    console.print(f"      run {run['run_id']}  {'; '.join(progress)}", style="dim", markup=False)
    return (
        run["status"] == "completed"
        and len(nodes) == 3
        and all(n.status == "completed" for n in nodes)
    )


def approval_flow(env: dict[str, str]) -> bool:
    """A prod read outside src/ waits for an approval by someone other than its submitter."""
    console.print("[bold]approval[/bold]: a prod read of README.md needs a second person")
    tokens = {}
    for principal, role in (("agent-runner", "submitter"), ("reviewer", "approver")):
        issued = run_cli(
            "token",
            "issue",
            "--principal",
            principal,
            "--role",
            role,
            "--expires-in",
            "1h",
            "--json",
            env=env,
        )
        tokens[principal] = json.loads(issued.stdout)["token"]
    submitter = dict(env, TOOLPLANE_TOKEN=tokens["agent-runner"])
    approver = dict(env, TOOLPLANE_TOKEN=tokens["reviewer"])
    waiting = run_cli(
        "call",
        "read_repo_file",
        "--arg",
        "path=README.md",
        "--env",
        "prod",
        "--on-behalf-of",
        "user:demo",
        "--json",
        env=submitter,
        check=False,
    )
    if waiting.returncode != 5:
        err.print(f"  expected to wait (exit 5), got {waiting.returncode}: {waiting.stderr}")
        return False
    run_id = json.loads(waiting.stdout)["run_id"]
    console.print(f"  [yellow]…[/yellow] {run_id} awaiting_approval (exit 5)")
    self_approval = run_cli("approve", run_id, "read_repo_file", env=submitter, check=False)
    console.print(
        f"  [green]✓[/green] the submitter may not approve: {self_approval.stderr.strip()}"
    )
    approved = run_cli(
        "approve",
        run_id,
        "read_repo_file",
        "--reason",
        "demo",
        "--json",
        env=approver,
        check=False,
    )
    if approved.returncode != 0:
        err.print(f"  approve failed: {approved.stderr.strip()}", markup=False)
        return False
    # The Python client follows the run's event stream (pushed from commit) to its end.
    with Client(env["TOOLPLANE_URL"], token=tokens["agent-runner"]) as client:
        node = client.wait(run_id, timeout=60).nodes[0]
    mark = "[green]✓[/green]" if node.status == "completed" else "[red]✗[/red]"
    approval_id = (node.approval or {}).get("approval_id")
    console.print(f"  {mark} approved by reviewer ({approval_id}): {summarize(node)}")
    return node.status == "completed" and self_approval.returncode != 0


if __name__ == "__main__":
    raise SystemExit(main())
