"""Batched ingest: many results per transaction, with the guarantees of one at a time.

Real results come from a real worker while the stack's control process is down (they wait
in ``results``); the tests then ingest them in batches, in this process through
``ingest_batch`` (to choose each batch's content) or in the control process (started
again, with a fault-injection point that kills it mid-batch). Every receipt is verified on
its own (a forged one in a batch is recorded, the rest are accepted), each result is
accepted once (copies in one batch or in two), and a control killed between verifying and
committing, or between committing and acknowledging, loses nothing and accepts nothing
twice.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery import Celery
from sqlalchemy import func, select

import celeryconfig
from control.ops.service import FAULT_FILE_ENV
from control.orchestration.ingest import Outcome, ingest_batch
from ledger.models import EvidenceEvent
from tests.harness import (
    Services,
    Stack,
    own_stack,
    wait_for,
)
from toolplane.canonical import digest

pytestmark = pytest.mark.integration

TOOL = "read_repo_file"


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("ingest-fault")) / "point"


@pytest.fixture(scope="module")
def batched(
    services: Services, tmp_path_factory: pytest.TempPathFactory, fault_file: Path
) -> Iterator[Stack]:
    """Its own Redis database and ledger: no other stack's control takes its results."""
    home = Path(tmp_path_factory.mktemp("batched"))
    extra = {FAULT_FILE_ENV: str(fault_file), "TOOLPLANE_VISIBILITY_TIMEOUT": "10"}
    with own_stack(services, home, workers={TOOL: 1}, extra_env=extra) as running:
        yield running


@pytest.fixture
def queue(batched: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(batched.services.redis_url)
    yield client
    client.close()


def results_waiting(stack: Stack, queue: redis.Redis, count: int) -> tuple[Any, list[str]]:
    """Stop the control; submit ``count`` calls (as a fresh tenant, whose client is
    returned); their results wait in ``results``."""
    stack.kill("control")
    client = stack.client(stack.tenant())
    run_ids = [client.submit(TOOL, {"path": "README.md"}) for _ in range(count)]
    wait_for(
        lambda: queue.llen(celeryconfig.RESULTS_QUEUE) >= count,
        timeout=60,
        what=f"{count} results queued",
    )
    return client, run_ids


def message_of(packed: bytes) -> Any:
    """The result message a queued Celery message carries (its task's one argument)."""
    return json.loads(base64.b64decode(json.loads(packed)["body"]))[0][0]


def take_results(queue: redis.Redis) -> list[Any]:
    """Every result message waiting in ``results``, taken off the queue (oldest first)."""
    raws = []
    while (packed := queue.rpop(celeryconfig.RESULTS_QUEUE)) is not None:
        raws.append(message_of(packed))
    return raws


def forge(raw: Any) -> Any:
    """A copy of a genuine result with other content: its receipt no longer verifies."""
    forged = copy.deepcopy(raw)
    forged["result"]["result"]["content"] = "rm -rf /"
    return forged


def kinds(client: Any, run_ids: list[str]) -> dict[str, dict[str, int]]:
    """Each run's evidence events, counted by kind."""
    counted: dict[str, dict[str, int]] = {run_id: {} for run_id in run_ids}
    with client.plane.sessions() as session:
        for run_id, kind, n in session.execute(
            select(EvidenceEvent.run_id, EvidenceEvent.kind, func.count())
            .where(EvidenceEvent.run_id.in_(run_ids))
            .group_by(EvidenceEvent.run_id, EvidenceEvent.kind)
        ):
            counted[run_id][kind] = n
    return counted


def ignored(client: Any, run_ids: list[str]) -> int:
    return sum(c.get("ResultIgnored", 0) for c in kinds(client, run_ids).values())


def recorded_invalid(client: Any, message: Any) -> list[dict[str, Any]]:
    """ToolReceiptInvalid recorded for ``message``: on the system chain, by its digest."""
    with client.plane.sessions() as session:
        return list(
            session.scalars(
                select(EvidenceEvent.payload).where(
                    EvidenceEvent.kind == "ToolReceiptInvalid",
                    EvidenceEvent.chain_id == "system",
                    EvidenceEvent.payload["message_sha256"].astext == digest(message),
                )
            )
        )


def accepted_once(client: Any, run_ids: list[str]) -> None:
    """Every run completed, with exactly one accepted result, and the ledger verifies."""
    wait_for(
        lambda: all(client.run(r).status == "completed" for r in run_ids),
        timeout=90,
        what="every run completed",
    )
    counted = kinds(client, run_ids)
    assert all(c.get("ToolCallCompleted") == 1 for c in counted.values()), counted
    assert all(c.get("RunCompleted") == 1 for c in counted.values()), counted
    assert all("ToolCallFailed" not in c for c in counted.values()), counted
    assert client.verify_ledger().ok


def test_a_forged_receipt_in_a_batch_is_recorded_and_the_rest_accepted_once(
    batched: Stack, queue: redis.Redis
) -> None:
    client, run_ids = results_waiting(batched, queue, 5)
    try:
        raws = take_results(queue)
        assert sorted(r["result"]["run_id"] for r in raws) == sorted(run_ids)
        forged = forge(raws[2])
        batch = [raws[0], raws[1], forged, raws[2], raws[3], raws[4], raws[0]]
        plane = client.plane
        with plane.sessions() as session:
            first = ingest_batch(session, batch, plane.keyring(), plane.governance())
        assert [i.outcome for i in first] == [
            Outcome.ACCEPTED,
            Outcome.ACCEPTED,
            Outcome.RECEIPT_INVALID,
            Outcome.ACCEPTED,  # the genuine result of the forged one's node
            Outcome.ACCEPTED,
            Outcome.ACCEPTED,
            Outcome.IGNORED,  # a copy in the same batch
        ]
        with plane.sessions() as session:  # copies in a later batch
            again = ingest_batch(session, [raws[1], raws[3]], plane.keyring(), plane.governance())
        assert [i.outcome for i in again] == [Outcome.IGNORED, Outcome.IGNORED]

        invalid = recorded_invalid(client, forged)
        assert len(invalid) == 1, invalid
        assert invalid[0]["claimed"]["run_id"] == raws[2]["result"]["run_id"]
        counted = kinds(client, run_ids)
        assert all("ToolReceiptInvalid" not in c for c in counted.values())  # no run's trail
        copies = {raws[i]["result"]["run_id"] for i in (0, 1, 3)}
        assert {r: c.get("ResultIgnored", 0) for r, c in counted.items()} == {
            r: int(r in copies) for r in run_ids
        }
        real = client.run(raws[2]["result"]["run_id"]).nodes[0]
        assert real.status == "completed"
        assert real.result_sha256 == raws[2]["result"]["result_sha256"]
        accepted_once(client, run_ids)
    finally:
        batched.start_missing()


def test_the_control_ingests_a_backlog_with_copies_and_a_forgery_once_each(
    batched: Stack, queue: redis.Redis
) -> None:
    client, run_ids = results_waiting(batched, queue, 12)
    packed = queue.lrange(celeryconfig.RESULTS_QUEUE, 0, -1)
    for message in packed[:4]:  # the broker delivers these four twice
        queue.lpush(celeryconfig.RESULTS_QUEUE, message)
    forged = forge(message_of(packed[5]))
    attacker = Celery("attacker", set_as_current=False)
    attacker.conf.update(celeryconfig.build_config(batched.services.redis_url))
    attacker.send_task(celeryconfig.INGEST_TASK, args=[forged], queue=celeryconfig.RESULTS_QUEUE)
    batched.start_missing()
    accepted_once(client, run_ids)
    wait_for(lambda: recorded_invalid(client, forged), timeout=30, what="the forgery recorded")
    wait_for(lambda: ignored(client, run_ids) == 4, timeout=30, what="the four copies ignored")


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_a_control_killed_mid_batch_loses_nothing_and_accepts_nothing_twice(
    batched: Stack, queue: redis.Redis, fault_file: Path, point: str
) -> None:
    """Killed (SIGKILL, at the fault-injection point) in its first batch of two or more:
    between verifying and committing, nothing of the batch committed and all of it comes
    back; between committing and acknowledging, the batch's results come back too, and
    are ignored as copies."""
    client, run_ids = results_waiting(batched, queue, 16)
    fault_file.write_text(point)
    batched.start_missing()
    psutil.Process(batched.pid("control")).wait(timeout=90)  # it killed itself there
    assert not fault_file.exists()
    batched.start_missing()
    accepted_once(client, run_ids)
    if point == "after_commit":  # the committed batch came back unacknowledged
        wait_for(lambda: ignored(client, run_ids) >= 2, timeout=60, what="the copies ignored")
