"""The lean submission path: jobs published from the values in hand, reads in autocommit,
waiting on the pushed stream. Each keeps the guarantee it replaced."""

from __future__ import annotations

import httpx
import pytest
from celery import Celery
from sqlalchemy import select

import celeryconfig
from control.governance.auth import Role
from control.orchestration.dispatch import CeleryPublisher, publish_pending, publish_staged
from control.orchestration.operations import Operations
from control.orchestration.submission import CallRequest, submit_run
from ledger.models import OutboxMessage
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.integration

FILE = "src/shipit/deploy.py"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def outbox(ops: Operations, run_id: str) -> list[tuple[object, int]]:
    with ops.plane.sessions() as session:
        rows = session.execute(
            select(OutboxMessage.published_at, OutboxMessage.publish_count).where(
                OutboxMessage.run_id == run_id
            )
        ).all()
    return [(published_at, count) for published_at, count in rows]


def staged_call(ops: Operations) -> tuple[str, dict[int, object]]:
    """A call submitted and committed, its job staged in the outbox and not yet published."""
    request = CallRequest(tool="read_repo_file", args={"path": FILE}).as_run()
    with ops.plane.sessions() as session:
        submitted = submit_run(
            session, identity=ops.identity, request=request, gov=ops.plane.governance(), call=True
        )
    assert submitted.created and len(submitted.staged) == 1
    return submitted.run_id, dict(submitted.staged)


def test_a_job_is_published_from_hand_once(stack: Stack, token: str) -> None:
    ops = stack.client(token)
    run_id, staged = staged_call(ops)
    assert outbox(ops, run_id) == [(None, 0)]
    assert publish_staged(ops.plane.sessions, ops.plane.publisher, staged) == 1  # type: ignore[arg-type]
    [(published_at, count)] = outbox(ops, run_id)
    assert published_at is not None and count == 1
    # Published already (here, or by the relay first): not published again.
    assert publish_staged(ops.plane.sessions, ops.plane.publisher, staged) == 0  # type: ignore[arg-type]
    assert outbox(ops, run_id)[0][1] == 1
    assert ops.wait(run_id, timeout=60).status == "completed"


def test_a_failed_publish_leaves_the_job_for_the_relay(stack: Stack, token: str) -> None:
    ops = stack.client(token)
    run_id, staged = staged_call(ops)
    dead = Celery("dead-broker", set_as_current=False)  # nothing listens on port 1
    dead.conf.update(celeryconfig.build_config("redis://127.0.0.1:1/0", visibility_timeout=60))
    dead.conf.broker_transport_options = {
        **dead.conf.broker_transport_options,
        "max_retries": 0,
    }
    dead.conf.task_publish_retry = False
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the transport raises
        publish_staged(ops.plane.sessions, CeleryPublisher(dead), staged)  # type: ignore[arg-type]
    assert outbox(ops, run_id) == [(None, 0)]  # the mark rolled back with the failure
    assert publish_pending(ops.plane.sessions, ops.plane.publisher, older_than_s=0) >= 1
    assert outbox(ops, run_id)[0][1] == 1
    assert ops.wait(run_id, timeout=60).status == "completed"


def test_a_revoked_token_fails_on_its_very_next_request(stack: Stack, token: str) -> None:
    admin = stack.client(token)
    issued = admin.issue_token("soon-revoked", Role.SUBMITTER)
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        assert http.get("/v1/runs", headers=bearer(issued.token)).status_code == 200
        admin.revoke_token(issued.token_id)
        gone = http.get("/v1/runs", headers=bearer(issued.token))
        assert gone.status_code == 401 and "revoked" in gone.json()["detail"]


def test_waiting_for_many_takes_each_status_from_the_stream(stack: Stack, token: str) -> None:
    api = stack.http(token)
    ids = [api.submit("read_repo_file", {"path": FILE}) for _ in range(3)]
    ids.append(api.submit("read_repo_file", {"path": ".env"}))  # denied by policy
    statuses = api.wait_all(ids, timeout=60)
    assert statuses == {**dict.fromkeys(ids[:3], "completed"), ids[3]: "denied"}
    for run_id, status in statuses.items():
        assert api.run(run_id).status == status


def test_a_stream_of_another_tenants_run_is_not_found(stack: Stack, token: str) -> None:
    api = stack.http(token)
    run_id = api.submit("read_repo_file", {"path": FILE})
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        other = http.get(f"/v1/runs/{run_id}/events", headers=bearer(stack.tenant()))
        assert other.status_code == 404
    wait_for(lambda: api.run(run_id).status == "completed", timeout=60, what="the run")
