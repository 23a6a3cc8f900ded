"""What must hold after any fault, however the runs ended: checked, and counted for the record."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from sqlalchemy import func, select

from control.orchestration.operations import Operations as Client
from control.orchestration.states import TERMINAL_RUN
from ledger.models import EvidenceEvent, Node, Run
from tests.harness import Stack
from toolplane.messages import job_id_for

ACCEPTED_KINDS = ("ToolCallCompleted", "ToolCallFailed")
_JOB_START = re.compile(r"job\.start job=(\S+) ")


def check_invariants(stack: Stack, run_ids: list[str], client: Client) -> dict[str, Any]:
    """Assert every run settled, no node had two results accepted and the ledger verifies.

    Returns the figures (JSON-serialisable), so that a test can print what the fault did:
    ``jobs_started_more_than_once`` shows that a fault really hit jobs in flight.
    """
    wanted = set(run_ids)
    with client.plane.sessions() as session:
        statuses = Counter(
            dict(
                session.execute(
                    select(Run.status, func.count()).where(Run.id.in_(wanted)).group_by(Run.status)
                ).all()
            )
        )
        node_id = EvidenceEvent.payload["node_id"].astext
        accepted_twice = session.execute(
            select(EvidenceEvent.run_id, node_id, func.count())
            .where(EvidenceEvent.run_id.in_(wanted), EvidenceEvent.kind.in_(ACCEPTED_KINDS))
            .group_by(EvidenceEvent.run_id, node_id)
            .having(func.count() > 1)
        ).all()
        jobs = [
            job_id_for(run_id, node, attempt)
            for run_id, node, last in session.execute(
                select(Node.run_id, Node.node_id, Node.attempt).where(Node.run_id.in_(wanted))
            )
            for attempt in range(1, last + 1)
        ]
    starts = Counter(
        job
        for entry in stack.processes
        if str(entry["name"]).startswith("worker-")
        for job in _JOB_START.findall(stack.log(str(entry["name"])))
    )
    terminal = sum(n for status, n in statuses.items() if status in TERMINAL_RUN)
    ledger = client.verify_ledger()
    report = {
        "runs": len(wanted),
        "by_status": dict(sorted(statuses.items())),
        "not_terminal": len(wanted) - terminal,  # a run that is missing counts too
        "nodes_accepted_twice": len(accepted_twice),
        "jobs_started_more_than_once": sum(1 for job in jobs if starts[job] > 1),
        "ledger_ok": ledger.ok,
        "ledger_events": ledger.events,
    }
    assert report["not_terminal"] == 0, report
    assert not accepted_twice, (report, accepted_twice[:5])
    assert ledger.ok, (report, ledger.as_dict()["broken"][:5])
    return report
