"""Dispatch: signed job envelopes and the transactional outbox.

A job is written to the outbox in the same transaction as its node's state and
its ToolCallDispatched evidence; it is published after the commit, and the
control process's relay re-publishes whatever a crashed publisher left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

from celery import Celery
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

import celeryconfig
from control.errors import UsageError
from ledger.models import Attempt, Json, OutboxMessage
from toolplane.canonical import digest
from toolplane.lifetimes import MAX_ENVELOPE_LIFETIME_S, RESULT_DUE_SLACK_S
from toolplane.messages import Envelope, SignedEnvelope, job_id_for, new_nonce, now_ms, signed_bytes
from toolplane.signing import Signer

log = logging.getLogger("toolplane.dispatch")

DUE_GRACE_S = RESULT_DUE_SLACK_S
"""After an envelope expired and a run that started just before could have ended: then no
worker runs the attempt any more, and a retry cannot overlap it."""

__all__ = [
    "CeleryPublisher",
    "Publisher",
    "due_at_for",
    "envelope_ttl_s",
    "Staged",
    "publish_pending",
    "publish_staged",
    "sign_envelope",
    "stage_job",
]


class Staged(NamedTuple):
    """An outbox message as its transaction wrote it (published from hand after the commit)."""

    task_name: str
    queue: str
    body: dict[str, Any]


class Publisher(Protocol):
    """The broker port: publish one task message to one queue."""

    def publish(self, *, task_name: str, queue: str, body: dict[str, Any]) -> None: ...


class CeleryPublisher:
    """Celery publishes to a direct queue through the default exchange (the routing key is
    the queue), so a lost ``_kombu.binding.*`` key on Redis cannot drop a job silently.
    The task id is the job id, so that a cancelled run's jobs can be revoked by id."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, *, task_name: str, queue: str, body: dict[str, Any]) -> None:
        job_id = (body.get("envelope") or {}).get("job_id")
        self.app.send_task(
            task_name,
            args=[body],
            queue=queue,
            routing_key=queue,
            task_id=job_id,
            # Celery's events, logs and Flower show this instead of the call's arguments.
            argsrepr=f"(<signed envelope {job_id}>,)",
            kwargsrepr="{}",
        )


def envelope_ttl_s(*, visibility_timeout: int, tool_timeout_s: float, queue_wait_s: int) -> int:
    """Expiry must outlive a wait in the queue, then a redelivery after a worker died with
    the job (visibility timeout) and the tool's own run time; and stay within the bound
    every worker enforces (MAX_ENVELOPE_LIFETIME_S), which no tool's time limit may break."""
    ttl = int(queue_wait_s + visibility_timeout + tool_timeout_s)
    if ttl > MAX_ENVELOPE_LIFETIME_S:
        raise UsageError(
            f"the tool's time limit ({tool_timeout_s:g} s) + TOOLPLANE_QUEUE_WAIT_S "
            f"({queue_wait_s}) + TOOLPLANE_VISIBILITY_TIMEOUT ({visibility_timeout}) make an "
            f"envelope live {ttl} s, over the bound of {MAX_ENVELOPE_LIFETIME_S} s that workers "
            "enforce",
            field="timeout_s",
        )
    return ttl


def due_at_for(expires_at: datetime, *, tool_timeout_s: float) -> datetime:
    """When an attempt's result is overdue: no worker can still be running it by then."""
    return expires_at + timedelta(seconds=tool_timeout_s + DUE_GRACE_S)


def sign_envelope(
    *,
    signer: Signer,
    run_id: str,
    node_id: str,
    attempt: int,
    tenant: str,
    principal: str,
    tool: str,
    args: dict[str, Any],
    decision_id: str,
    policy_version: str,
    ttl_s: int,
    approval_id: str | None = None,
    on_behalf_of: str | None = None,
    limits: dict[str, int | float] | None = None,
    egress: list[str] | None = None,
    private_egress: list[str] | None = None,
    traceparent: str | None = None,
) -> SignedEnvelope:
    issued = now_ms()
    envelope = Envelope(
        job_id=job_id_for(run_id, node_id, attempt),
        run_id=run_id,
        node_id=node_id,
        attempt=attempt,
        tenant=tenant,
        principal=principal,
        on_behalf_of=on_behalf_of,
        tool=tool,
        audience=celeryconfig.tool_queue(tool),
        args=args,
        args_sha256=digest(args),
        policy_decision_id=decision_id,
        policy_version=policy_version,
        approval_id=approval_id,
        limits=limits or None,
        egress=egress,
        private_egress=private_egress or None,
        issued_at=issued,
        expires_at=issued + ttl_s * 1000,
        nonce=new_nonce(),
        key_id=signer.key_id,
        traceparent=traceparent,
    )
    return SignedEnvelope(envelope=envelope, signature=signer.sign(signed_bytes(envelope)))


# The attempt and its job in the outbox, in one statement (one round trip; no ORM flush).
_ATTEMPT = insert(Attempt).values(
    run_id=bindparam("run_id"),
    node_id=bindparam("node_id"),
    attempt=bindparam("attempt"),
    job_id=bindparam("job_id"),
    envelope_sha256=bindparam("envelope_sha256"),
    dispatched_at=bindparam("dispatched_at"),
    expires_at=bindparam("expires_at"),
    due_at=bindparam("due_at"),
    status="queued",
)
_STAGE = (
    insert(OutboxMessage)
    .values(
        run_id=bindparam("run_id"),
        node_id=bindparam("node_id"),
        attempt=bindparam("attempt"),
        task_name=bindparam("queue"),
        queue=bindparam("queue"),
        body=bindparam("body", type_=Json),
        created_at=bindparam("dispatched_at"),
        publish_count=0,
    )
    .returning(OutboxMessage.id)
    .add_cte(_ATTEMPT.cte("new_attempt"))
)


def stage_job(
    session: Session,
    signed: SignedEnvelope,
    *,
    dispatched_at: datetime,
    expires_at: datetime,
    due_at: datetime,
) -> tuple[int, Staged]:
    """Record the attempt (``queued``) and add its job to the outbox, in the caller's
    transaction; returns the outbox id and the message as written."""
    envelope = signed.envelope
    queue = celeryconfig.tool_queue(envelope.tool)
    body = signed.model_dump(mode="json")
    # On the connection: a Core statement, not the ORM's bulk path (nor its autoflush; the
    # node goes in at the caller's flush).
    outbox_id = (
        session.connection()
        .execute(
            _STAGE,
            {
                "run_id": envelope.run_id,
                "node_id": envelope.node_id,
                "attempt": envelope.attempt,
                "job_id": envelope.job_id,
                "envelope_sha256": signed.digest,
                "dispatched_at": dispatched_at,
                "expires_at": expires_at,
                "due_at": due_at,
                "queue": queue,
                "body": body,
            },
        )
        .scalar_one()
    )
    return int(outbox_id), Staged(queue, queue, body)


def publish_pending(
    sessions: sessionmaker[Session],
    publisher: Publisher,
    *,
    ids: Iterable[int] | None = None,
    older_than_s: float = 0.0,
    limit: int = 200,
) -> int:
    """Publish unpublished outbox messages (the given ids, or every one old enough).

    The mark that a message was published is committed without waiting for the
    disk: losing it in a crash only makes the relay publish the job again, which
    the workers' claims and exactly-once ingest make harmless.
    """
    if ids is not None:
        return _publish_ids(sessions, publisher, list(ids))
    with sessions() as session:
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        query = select(OutboxMessage).where(
            OutboxMessage.published_at.is_(None), OutboxMessage.created_at < cutoff
        )
        rows = session.scalars(
            query.order_by(OutboxMessage.id).limit(limit).with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            publisher.publish(task_name=row.task_name, queue=row.queue, body=row.body)
            session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == row.id)
                .values(published_at=datetime.now(UTC), publish_count=row.publish_count + 1)
            )
            log.info(
                "job.published run=%s node=%s attempt=%s", row.run_id, row.node_id, row.attempt
            )
        session.commit()
        return len(rows)


def _publish_ids(sessions: sessionmaker[Session], publisher: Publisher, ids: list[int]) -> int:
    with sessions() as session:
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))
        rows = session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(ids), OutboxMessage.published_at.is_(None))
            .values(published_at=datetime.now(UTC), publish_count=OutboxMessage.publish_count + 1)
            .returning(OutboxMessage.task_name, OutboxMessage.queue, OutboxMessage.body)
        ).all()
        for task_name, queue, body in rows:
            publisher.publish(task_name=task_name, queue=queue, body=body)
        session.commit()  # after publishing: a failed publish leaves the row for the relay
        return len(rows)


# The mark of jobs published from hand, in one statement that also lets the commit skip the
# wait for the disk (set_config(..., true) lasts for the transaction).
_MARK = text(
    "UPDATE outbox SET published_at = :now, publish_count = outbox.publish_count + 1"
    " FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"
    " WHERE outbox.id = ANY(:ids) AND outbox.published_at IS NULL"
    " RETURNING outbox.id"
)


def publish_staged(
    sessions: sessionmaker[Session], publisher: Publisher, staged: Mapping[int, Staged]
) -> int:
    """Publish the messages a committed transaction staged, from the values in hand (as
    :func:`publish_pending` with ids, without reading the bodies back): marked first, in
    the same transaction, so that only those not yet published (by the relay) go out; the
    mark commits after publishing, so a failed publish leaves the row for the relay."""
    if not staged:
        return 0
    with sessions() as session:
        marked = set(
            session.execute(_MARK, {"ids": list(staged), "now": datetime.now(UTC)}).scalars()
        )
        for outbox_id, message in staged.items():
            if outbox_id in marked:
                publisher.publish(
                    task_name=message.task_name, queue=message.queue, body=message.body
                )
        session.commit()
        return len(marked)
