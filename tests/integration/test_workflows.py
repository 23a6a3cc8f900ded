"""Workflows end to end: DAG order, per-node policy, failure and cancellation, idempotency."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from sqlalchemy import select, update

from control.errors import AuthError, NotFound, UsageError
from control.governance.auth import Role
from control.orchestration.operations import Operations as Client
from control.orchestration.workflows import parse_workflow
from ledger.models import Attempt, EvidenceEvent, Node
from tests.harness import Stack, wait_for
from tests.integration.govern import evidence

pytestmark = pytest.mark.integration

CHAIN = """
name: chain
inputs:
  first: {type: number}
nodes:
  - id: a
    tool: sleepy
    args: {seconds: "${inputs.first}", tag: "a"}
  - id: b
    tool: sleepy
    needs: [a]
    args: {seconds: 0, tag: "after ${nodes.a.result.slept}"}
"""


def kinds(client: Client, run_id: str) -> list[str]:
    return [k for k, _ in evidence(client, run_id)]


def test_repo_review_runs_in_order_each_node_decided(stack: Stack, token: str) -> None:
    client = stack.client(token)
    seen: list[tuple[str, str, int]] = []
    view = client.run_workflow(
        "repo-review",
        {"query": "ledger", "path": "src/shipit/deploy.py"},
        wait=True,
        timeout=90,
        on_progress=lambda *change: seen.append(change),
    )
    assert view.status == "completed", view
    assert [n.node_id for n in view.nodes] == ["search", "read", "lint"]
    search, read, lint = view.nodes
    assert search.result["hits"] and read.result["path"] == "src/shipit/deploy.py"
    assert lint.args == {"code": read.result["content"]}  # templated from read's result
    assert lint.needs == ("search", "read")
    assert ("lint", "completed", 1) in seen and ("read", "queued", 1) in seen
    trail = evidence(client, view.run_id)
    decided = [p["node_id"] for k, p in trail if k == "PolicyDecision"]
    assert sorted(decided) == ["lint", "read", "search"]  # one decision per node
    order = [(k, p.get("node_id")) for k, p in trail]
    lint_dispatched = order.index(("ToolCallDispatched", "lint"))
    assert order.index(("ToolCallCompleted", "read")) < lint_dispatched
    assert order.index(("ToolCallCompleted", "search")) < lint_dispatched
    submitted = trail[0][1]
    assert trail[0][0] == "RunSubmitted" and submitted["workflow"] == "repo-review"
    assert submitted["inputs"] == {"query": "ledger", "path": "src/shipit/deploy.py"}
    assert submitted["workflow_spec"]["nodes"][2]["needs"] == ["search", "read"]
    assert trail[-1][0] == "RunCompleted"
    assert client.verify_ledger(run_id=view.run_id).ok


def test_cli_submit_shows_progress_and_exits_with_the_status(stack: Stack, token: str) -> None:
    done = stack.cli(
        "submit",
        "repo-review",
        "--input",
        "query=deploy",
        "--input",
        "path=src/shipit/manifest.py",
        "--wait",
        "--json",
        token=token,
    )
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "completed" and run["workflow"] == "repo-review"
    for node in ("search", "read", "lint"):
        assert f"  {node}: queued" in done.stderr and f"  {node}: completed" in done.stderr
    missing = stack.cli("submit", "repo-review", "--input", "query=x", token=token)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: --input path: repo-review needs this input"
    unknown = stack.cli("submit", "nope", token=token)
    assert unknown.returncode == 2 and "no workflow 'nope'" in unknown.stderr
    listed = stack.cli("workflows", "list", "--json", token=token)
    assert [w["name"] for w in json.loads(listed.stdout)] == ["repo-review"]


def test_a_node_denied_by_its_own_arguments_denies_the_run(stack: Stack, token: str) -> None:
    """lint's arguments exist only once read completed: its own decision denies it."""
    big = Path(stack.env["TOOLPLANE_REPO_ROOT"]) / "src" / f"big_{secrets.token_hex(3)}.py"
    big.write_text("x = 1\n" * 20_000)  # 120,000 characters: over lint-code-size
    client = stack.client(token)
    view = client.run_workflow(
        "repo-review",
        {"query": "deploy", "path": f"src/{big.name}"},
        wait=True,
        timeout=90,
    )
    assert view.status == "denied", view
    statuses = {n.node_id: n.status for n in view.nodes}
    assert statuses == {"search": "completed", "read": "completed", "lint": "denied"}
    trail = evidence(client, view.run_id)
    lint_decision = next(p for k, p in trail if k == "PolicyDecision" and p["node_id"] == "lint")
    assert lint_decision["decision"] == "deny"
    assert "lint-code-size" in lint_decision["policies"]
    assert [k for k, _ in trail].count("ToolCallDispatched") == 2  # lint never went out
    failed = next(p for k, p in trail if k == "RunFailed")
    assert failed["status"] == "denied" and failed["node_id"] == "lint"


def test_a_failed_node_fails_the_run_and_cancels_what_depends_on_it(
    stack: Stack, token: str
) -> None:
    client = stack.client(token)
    done = stack.cli(
        "submit",
        "repo-review",
        "--input",
        "query=deploy",
        "--input",
        "path=src/missing.py",
        "--wait",
        "--json",
        token=token,
    )
    assert done.returncode == 4, done.stderr  # the tool failed
    run = json.loads(done.stdout)
    nodes = {n["node_id"]: n for n in run["nodes"]}
    assert nodes["read"]["status"] == "failed"
    assert nodes["read"]["error"]["code"] == "not_found"
    assert nodes["lint"]["status"] == "cancelled"
    assert nodes["lint"]["args"] is None  # never rendered, never decided
    assert "lint" not in [
        p.get("node_id") for k, p in evidence(client, run["run_id"]) if k == "PolicyDecision"
    ]


def test_bad_templates_and_tools_are_refused_before_anything_runs(stack: Stack, token: str) -> None:
    client = stack.client(token)
    unknown_tool = parse_workflow("name: w\nnodes: [{id: a, tool: nosuch}]\n", source="w.yaml")
    with pytest.raises(UsageError, match="node a: tool: unknown tool 'nosuch'"):
        client.submit_workflow(unknown_tool)
    bad_args = parse_workflow(
        "name: w\nnodes: [{id: a, tool: sleepy, args: {seconds: 99}}]\n", source="w.yaml"
    )
    with pytest.raises(UsageError, match="node a: --arg seconds"):
        client.submit_workflow(bad_args)
    assert client.runs() == []
    # A template into a field the result does not have fails the node when it renders.
    late = parse_workflow(
        CHAIN.replace("nodes.a.result.slept", "nodes.a.result.nothing"), source="w.yaml"
    )
    view = client.run_workflow(late, {"first": 0}, wait=True, timeout=60)
    assert view.status == "failed"
    b = view.nodes[1]
    assert (b.status, b.error["code"]) == ("failed", "invalid_argument")
    assert "${nodes.a.result.nothing}: nodes.a.result has no 'nothing'" in b.error["message"]


def test_idempotency_key_same_request_same_run_other_request_refused(
    stack: Stack, token: str
) -> None:
    client = stack.client(token)
    spec = parse_workflow(CHAIN, source="chain.yaml")
    key = f"k-{secrets.token_hex(4)}"
    first = client.submit_workflow(spec, {"first": 0}, idempotency_key=key)
    again = client.submit_workflow(spec, {"first": 0}, idempotency_key=key)
    assert again == first
    with pytest.raises(UsageError, match=f"--idempotency-key: .{key}. was already used .*{first}"):
        client.submit_workflow(spec, {"first": 1}, idempotency_key=key)
    client.wait(first, timeout=60)
    assert kinds(client, first).count("RunSubmitted") == 1


def test_cancel_stops_dispatch_and_ignores_the_late_result(stack: Stack, token: str) -> None:
    client = stack.client(token)
    # a sleeps 6 s (its limit is 8 s) so that the cancel, a CLI process started on a
    # loaded CI machine, lands while a is still running.
    run_id = client.submit_workflow(parse_workflow(CHAIN, source="chain.yaml"), {"first": 6})
    job = f"{run_id}/a/1"
    wait_for(lambda: stack.starts("sleepy", job) == 1, timeout=30, what="a to start")
    # Another submitter of the tenant may see the run, not cancel it.
    mallory = stack.client(client.issue_token("mallory", Role.SUBMITTER).token)
    with pytest.raises(AuthError, match="another principal submitted it"):
        mallory.cancel(run_id)
    assert mallory.run(run_id).status == "running"
    done = stack.cli("runs", "cancel", run_id, "--reason", "changed my mind", "--json", token=token)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["status"] == "cancelled"
    assert {n["node_id"]: n["status"] for n in view["nodes"]} == {
        "a": "cancelled",
        "b": "cancelled",
    }
    trail = wait_for(
        lambda: (t := evidence(client, run_id)) and "ResultIgnored" in [k for k, _ in t] and t,
        timeout=30,
        what="a's late result",
    )
    cancelled = next(p for k, p in trail if k == "RunCancelled")
    assert cancelled["reason"] == "changed my mind" and cancelled["in_flight"] == [job]
    ignored = next(p for k, p in trail if k == "ResultIgnored")
    assert ignored["node_id"] == "a" and "cancelled" in ignored["reason"]
    assert "ToolCallCompleted" not in [k for k, _ in trail]
    assert [p["node_id"] for k, p in trail if k == "ToolCallDispatched"] == ["a"]
    assert client.verify_ledger(run_id=run_id).ok  # the ignored result's receipt verifies
    again = stack.cli("runs", "cancel", run_id, token=token)
    assert again.returncode == 2 and "already ended (cancelled)" in again.stderr
    other = stack.client(stack.tenant())
    with pytest.raises(NotFound):
        other.cancel(run_id)


def _lose_current_attempt(client: Client, run_id: str, node_id: str) -> None:
    """Make the node's current attempt overdue now (as if its job had been lost)."""
    with client.plane.sessions() as session:
        past = "2000-01-01T00:00:00+00:00"
        session.execute(
            update(Node).where(Node.run_id == run_id, Node.node_id == node_id).values(due_at=past)
        )
        session.execute(
            update(Attempt)
            .where(Attempt.run_id == run_id, Attempt.node_id == node_id)
            .values(due_at=past)
        )
        session.commit()


def test_an_overdue_attempt_is_retried_and_the_old_result_ignored(stack: Stack, token: str) -> None:
    """While attempt 1 still runs, the sweeper finds it overdue and dispatches attempt 2:
    attempt 1's result comes back but is ignored; attempt 2's is the one accepted."""
    client = stack.client(token)
    stack.sweeper_armed()
    view = client.call("sleepy", {"seconds": 2, "tag": secrets.token_hex(3)})
    wait_for(lambda: stack.starts("sleepy", f"{view.run_id}/sleepy/1") == 1, timeout=30)
    _lose_current_attempt(client, view.run_id, "sleepy")
    final = client.wait(view.run_id, timeout=90)
    assert final.status == "completed" and final.nodes[0].attempt == 2, final
    trail = evidence(client, view.run_id)
    timed = next(p for k, p in trail if k == "NodeTimedOut")
    assert timed["attempt"] == 1 and timed["retry_at"] is not None
    assert [p["attempt"] for k, p in trail if k == "ToolCallDispatched"] == [1, 2]
    assert [p["attempt"] for k, p in trail if k == "ToolCallCompleted"] == [2]
    wait_for(lambda: "ResultIgnored" in kinds(client, view.run_id), timeout=30, what="attempt 1")
    assert client.verify_ledger(run_id=view.run_id).ok


def test_a_tool_not_safe_to_retry_times_out(stack: Stack, token: str) -> None:
    """probe is not read-only: a lost attempt ends its node timed_out, no second attempt."""
    client = stack.client(token)
    stack.sweeper_armed()
    view = client.call("probe", {"action": "loop"})
    _lose_current_attempt(client, view.run_id, "probe")
    final = client.wait(view.run_id, timeout=60)
    assert final.status == "failed"
    node = final.nodes[0]
    assert (node.status, node.attempt, node.error["code"]) == ("timed_out", 1, "timeout")
    trail = evidence(client, view.run_id)
    assert next(p for k, p in trail if k == "NodeTimedOut")["retry_at"] is None
    with client.plane.sessions() as session:
        attempts = session.scalars(
            select(Attempt.status).where(Attempt.run_id == view.run_id)
        ).all()
    assert attempts == ["lost"]
    # probe's own result (a timeout of its loop) is recorded but not accepted
    wait_for(lambda: "ResultIgnored" in kinds(client, view.run_id), timeout=30)
    with client.plane.sessions() as session:
        accepted = session.scalars(
            select(EvidenceEvent.kind).where(
                EvidenceEvent.run_id == view.run_id,
                EvidenceEvent.kind.in_(["ToolCallCompleted", "ToolCallFailed"]),
            )
        ).all()
    assert accepted == []


def test_a_lost_binding_does_not_drop_jobs(stack: Stack, token: str) -> None:
    """kombu drops a message routed through an exchange whose binding key is gone; our jobs
    go through the default exchange, so losing every binding key loses nothing."""
    broker = stack.services.redis()
    broker.delete("_kombu.binding.tool.sleepy", "_kombu.binding.results")
    client = stack.client(token)
    assert client.call("sleepy", {"seconds": 0}, wait=True, timeout=30).status == "completed"


def test_a_submitter_that_dies_before_publishing_loses_nothing(stack: Stack, token: str) -> None:
    """The run and its job are committed together; the process that committed them dies
    before publishing (here: never publishes). The control's relay publishes it once."""
    from control.orchestration.submission import RunRequest, submit_run
    from ledger.models import OutboxMessage

    client = stack.client(token)
    with client.plane.sessions() as session:
        submitted = submit_run(
            session,
            identity=client.identity,
            request=RunRequest(
                spec=parse_workflow(CHAIN, source="chain.yaml"), inputs={"first": 0}
            ),
            gov=client.plane.governance(),
        )
    assert submitted.outbox_ids  # staged, not published
    final = client.wait(submitted.run_id, timeout=60)
    assert final.status == "completed"
    with client.plane.sessions() as session:
        counts = session.scalars(
            select(OutboxMessage.publish_count).where(OutboxMessage.run_id == submitted.run_id)
        ).all()
    assert counts == [1, 1]  # a by the relay, b by the control after a's result


def test_the_sweeper_waits_until_the_results_are_read(stack: Stack) -> None:
    """No attempt is given up while results may still wait unread: not in the grace after
    the control starts, not while results queue up (unless they never clear), not while
    the broker cannot be asked."""
    import time

    from celery import Celery

    import celeryconfig
    from control.ops.service import CaughtUp

    app = Celery("caught-up-test", set_as_current=False)
    app.conf.update(celeryconfig.build_config(stack.services.spare_redis_url()))
    caught_up = CaughtUp(app, grace_s=0.5)
    assert caught_up() is False  # just started: a dead control's results may come back
    time.sleep(0.6)
    assert caught_up() is True  # the queue is empty (on Redis: its list has no key)
    app.send_task(celeryconfig.INGEST_TASK, args=[{}], queue=celeryconfig.RESULTS_QUEUE)
    assert caught_up.results_waiting() == 1
    assert caught_up() is False  # a result waits unread
    time.sleep(0.6)
    assert caught_up() is True  # ... for as long as the grace: a backlog that never clears
    app.connection_for_write().default_channel.queue_purge(celeryconfig.RESULTS_QUEUE)
    held = CaughtUp(app, grace_s=0.3)
    time.sleep(0.4)
    assert held() is True
    with held.inflight:
        assert held() is False  # this process holds a result it has not settled
    held.inflight.database_error()
    assert held() is False  # what it handed back for the database comes round again
    down = Celery("caught-up-down", set_as_current=False)
    down.conf.update(celeryconfig.build_config("redis://127.0.0.1:1/0"))
    down.conf.broker_connection_timeout = 1
    down.conf.broker_connection_max_retries = 0
    unreachable = CaughtUp(down, grace_s=0)
    assert unreachable() is False
