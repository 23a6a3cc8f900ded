"""Faults with real processes and many runs in flight: nothing lost, nothing accepted twice.

Each test submits runs of a two-node workflow (a, then b templated from a's
result) on a stack of its own on dedicated Redis and PostgreSQL, injects a
fault while jobs are queued, running and being ingested, recovers, and then
checks that every run ended, every run completed (no result lost), no node
had two results accepted, and the ledger verifies. The figures are printed
(``pytest -rP tests/faults``) for the record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from control.orchestration.operations import Operations as Client
from control.orchestration.states import TERMINAL_RUN
from control.orchestration.workflows import WorkflowSpec, parse_workflow
from ledger.models import EvidenceEvent, Node, Run
from tests.faults.conftest import MakeFaultStack
from tests.faults.invariants import check_invariants
from tests.faults.servers import Dedicated
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.integration

CHAIN: WorkflowSpec = parse_workflow(
    """
name: chain
inputs:
  seconds: {type: number}
  tag: {type: string}
nodes:
  - id: a
    tool: sleepy
    args: {seconds: "${inputs.seconds}", tag: "${inputs.tag}"}
  - id: b
    tool: sleepy
    needs: [a]
    args: {seconds: "${inputs.seconds}", tag: "${inputs.tag} after ${nodes.a.result.slept}"}
""",
    source="chain.yaml",
)
WORKERS = {"sleepy": 2}


def submit_many(client: Client, count: int, seconds: float) -> list[str]:
    return [
        client.submit_workflow(CHAIN, {"seconds": seconds, "tag": f"run-{i}"}) for i in range(count)
    ]


def progress(client: Client, run_ids: list[str]) -> dict[str, int]:
    """How far the runs are: nodes completed, runs ended."""
    with client.plane.sessions() as session:
        completed = session.scalar(
            select(func.count()).where(Node.run_id.in_(run_ids), Node.status == "completed")
        )
        ended = session.scalar(
            select(func.count()).where(Run.id.in_(run_ids), Run.status.in_(list(TERMINAL_RUN)))
        )
    return {"nodes_completed": int(completed or 0), "runs_ended": int(ended or 0)}


def wait_all_ended(stack: Stack, client: Client, run_ids: list[str], *, timeout: float) -> float:
    """Seconds until every run ended (polling through database outages), with the stack's
    supervisor starting again any process that exited meanwhile, as `toolplane up` does."""
    started = time.monotonic()

    def ended() -> bool:
        stack.supervisor.check()
        try:
            return progress(client, run_ids)["runs_ended"] == len(run_ids)
        except OperationalError:
            return False

    wait_for(ended, timeout=timeout, interval=0.5, what="every run to end")
    return time.monotonic() - started


def report(
    stack: Stack,
    client: Client,
    run_ids: list[str],
    *,
    fault: str,
    injected: int,
    recovered_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    checked = check_invariants(stack, run_ids, client)
    with client.plane.sessions() as session:
        not_completed = session.scalar(
            select(func.count()).where(Node.run_id.in_(run_ids), Node.status != "completed")
        )
        ignored = session.scalar(
            select(func.count()).where(
                EvidenceEvent.run_id.in_(run_ids), EvidenceEvent.kind == "ResultIgnored"
            )
        )
        retried = session.scalar(
            select(func.count()).where(Node.run_id.in_(run_ids), Node.attempt > 1)
        )
    figures = {
        "fault": fault,
        "runs_in_flight": len(run_ids),
        "faults_injected": injected,
        "runs_completed": checked["by_status"].get("completed", 0),
        "results_lost": int(not_completed or 0),
        "duplicates_accepted": checked["nodes_accepted_twice"],
        "results_ignored": int(ignored or 0),
        "nodes_retried": int(retried or 0),
        "jobs_started_more_than_once": checked["jobs_started_more_than_once"],
        "time_to_recover_s": round(recovered_s, 1),
        "restarted_by_supervisor": dict(stack.supervisor.restarts),
        "ledger_events": checked["ledger_events"],
    } | (extra or {})
    print(json.dumps(figures))
    assert figures["results_lost"] == 0, figures
    assert figures["runs_completed"] == len(run_ids), figures
    return figures


def when(client: Client, run_ids: list[str], test: Callable[[dict[str, int]], bool]) -> None:
    wait_for(lambda: test(progress(client, run_ids)), timeout=60, interval=0.05)


@pytest.mark.timeout(300)
def test_kill_9_a_tool_worker_mid_jobs_then_start_it_again(
    make_fault_stack: MakeFaultStack,
) -> None:
    stack = make_fault_stack(workers=WORKERS)
    client = stack.client(stack.tenant())
    run_ids = submit_many(client, 20, 0.5)
    when(client, run_ids, lambda p: p["nodes_completed"] >= 6)
    stack.kill("worker-sleepy")  # with the jobs it holds, and its sandboxes
    killed_at = time.monotonic()
    time.sleep(2)
    stack.start_missing()
    wait_all_ended(stack, client, run_ids, timeout=240)
    recovered = time.monotonic() - killed_at
    report(stack, client, run_ids, fault="kill -9 tool worker", injected=1, recovered_s=recovered)


@pytest.mark.timeout(300)
def test_kill_9_the_control_during_dispatch_and_ingest_then_start_it_again(
    make_fault_stack: MakeFaultStack,
) -> None:
    """The control ingests a's results and dispatches b in the same transaction: killed at
    three moments while that goes on, it loses nothing and accepts nothing twice."""
    stack = make_fault_stack(workers=WORKERS)
    client = stack.client(stack.tenant())
    run_ids = submit_many(client, 30, 0.2)
    kills = 0
    first_kill = None
    for threshold in (4, 20, 36):
        when(client, run_ids, lambda p, t=threshold: p["nodes_completed"] >= t)
        stack.kill("control")
        first_kill = first_kill or time.monotonic()
        kills += 1
        time.sleep(1.5)  # results pile up in the queue meanwhile
        stack.start_missing()
    wait_all_ended(stack, client, run_ids, timeout=240)
    recovered = time.monotonic() - (first_kill or time.monotonic())
    report(stack, client, run_ids, fault="kill -9 control", injected=kills, recovered_s=recovered)


@pytest.mark.timeout(420)
def test_restart_redis_with_nothing_persisted(
    make_fault_stack: MakeFaultStack, dedicated: Dedicated
) -> None:
    """Every queued job, every unacknowledged result and every claim is lost: the sweeper
    finds the lost attempts overdue and retries them (the tool is read-only)."""
    stack = make_fault_stack(workers=WORKERS)
    client = stack.client(stack.tenant())
    run_ids = submit_many(client, 20, 1.0)
    when(client, run_ids, lambda p: p["nodes_completed"] >= 4)
    dedicated.redis.restart()
    restarted = time.monotonic()
    wait_all_ended(stack, client, run_ids, timeout=360)
    recovered = time.monotonic() - restarted
    figures = report(
        stack, client, run_ids, fault="restart Redis (empty)", injected=1, recovered_s=recovered
    )
    assert figures["nodes_retried"] > 0, figures  # the restart did lose jobs


@pytest.mark.timeout(300)
def test_stop_postgres_while_results_arrive(
    make_fault_stack: MakeFaultStack, dedicated: Dedicated
) -> None:
    """Results wait in the queue (unacknowledged) while the database is down; the control
    catches up when it returns."""
    stack = make_fault_stack(workers=WORKERS)
    client = stack.client(stack.tenant())
    run_ids = submit_many(client, 20, 0.5)
    when(client, run_ids, lambda p: p["nodes_completed"] >= 4)
    dedicated.postgres.stop()
    stopped = time.monotonic()
    time.sleep(15)  # several seconds of results arrive with nowhere to go
    dedicated.postgres.start()
    wait_all_ended(stack, client, run_ids, timeout=240)
    recovered = time.monotonic() - stopped
    waited = stack.log("control").count("ingest.waiting_for_database")
    report(
        stack,
        client,
        run_ids,
        fault="stop PostgreSQL 15 s",
        injected=1,
        recovered_s=recovered,
        extra={"ingest_waits_logged": waited},
    )
    assert waited > 0  # results did arrive during the outage
