"""kill -9 in the middle of a job: the job is redelivered, runs again, is accepted once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from ledger.models import EvidenceEvent
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_kill_9_mid_job_redelivers_and_accepts_once(
    stack: Stack, token: str, tmp_path: Path
) -> None:
    client = stack.client(token)
    view = client.call("sleepy", {"seconds": 3})
    job = f"{view.run_id}/sleepy/1"
    wait_for(lambda: stack.starts("sleepy", job) == 1, timeout=30, what="the job to start")
    pool = psutil.Process(stack.worker_pid("sleepy")).children()
    assert len(pool) == 1  # concurrency 1: this pool child holds the job
    os.kill(pool[0].pid, signal.SIGKILL)  # its sandbox runner dies with it (--die-with-parent)
    started = time.monotonic()

    final = client.wait(view.run_id, timeout=90)
    recovered = time.monotonic() - started
    assert final.status == "completed", final
    assert final.nodes[0].attempt == 1
    assert stack.starts("sleepy", job) == 2  # killed once, ran once more
    with client.plane.sessions() as session:
        accepted = list(
            session.scalars(
                select(EvidenceEvent.kind).where(
                    EvidenceEvent.run_id == view.run_id, EvidenceEvent.kind == "ToolCallCompleted"
                )
            )
        )
    assert accepted == ["ToolCallCompleted"]
    assert client.verify_ledger().ok
    # the lease (tool timeout 8 s + 5 s margin) bounds recovery
    assert recovered < 60
    # and the worker goes on serving
    assert client.call("sleepy", {"seconds": 0}, wait=True).status == "completed"
