"""Submission: a run of a workflow (or of one call) recorded, and its first nodes decided.

In one transaction: the run with its workflow and inputs, every node
(``pending``), RunSubmitted, and then the orchestrator's first step (each node
without dependencies decided under policy, with its own evidence, and staged
in the outbox if allowed). The same idempotency key returns the same run; used
again for a different request, it is refused.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from control.errors import Conflict, UsageError, require_text
from control.governance.auth import Identity
from control.governance.freeze import active_freeze
from control.orchestration.dispatch import Staged
from control.orchestration.intake import Governance, Submitter, dispatching
from control.orchestration.manifests import not_approved
from control.orchestration.orchestrator import RunState, advance
from control.orchestration.runs import RunView, view_of
from control.orchestration.spans import intake_span
from control.orchestration.states import NodeStatus, RunStatus
from control.orchestration.validation import check_label, validate_args
from control.orchestration.workflows import WorkflowSpec, coerce_inputs, render, single_call
from ledger.chain import NewEvent
from ledger.models import Node, Run
from ledger.store import append_events
from toolplane import logfields
from toolplane.canonical import digest

log = logging.getLogger("toolplane.submission")

__all__ = ["CallRequest", "RunRequest", "Submitted", "check_run", "submit_run"]

_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class RunRequest:
    spec: WorkflowSpec
    inputs: dict[str, Any] = field(default_factory=dict)
    environment: str = "dev"
    classification: str = "internal"
    idempotency_key: str | None = None
    on_behalf_of: str | None = None  # the agent or end user the principal acts for


@dataclass(frozen=True)
class CallRequest:
    """One tool call: a run of a one-node workflow named ``call``."""

    tool: str
    args: dict[str, Any]
    environment: str = "dev"
    classification: str = "internal"
    idempotency_key: str | None = None
    on_behalf_of: str | None = None

    def as_run(self) -> RunRequest:
        return RunRequest(
            spec=single_call(self.tool, self.args),
            environment=self.environment,
            classification=self.classification,
            idempotency_key=self.idempotency_key,
            on_behalf_of=self.on_behalf_of,
        )


@dataclass(frozen=True)
class Submitted:
    run_id: str
    outbox_ids: tuple[int, ...]
    created: bool  # False when the idempotency key returned an existing run
    view: RunView | None = None  # the run as committed (None: an existing run, read it)
    staged: Mapping[int, Staged] = field(default_factory=dict)  # outbox id -> message


def _check_request(session: Session, request: RunRequest, gov: Governance, *, call: bool) -> None:
    check_label(request.environment, "--env")
    check_label(request.classification, "--classification")
    if request.on_behalf_of is not None:
        require_text(request.on_behalf_of, field="--on-behalf-of", max_chars=200)
    if request.idempotency_key is not None:
        require_text(request.idempotency_key, field="--idempotency-key", max_chars=200)
    for node in request.spec.nodes:
        manifest = gov.manifests(session, node.tool)
        if manifest is None:
            raise not_approved(
                session, node.tool, field="TOOL" if call else f"node {node.id}: tool"
            )


def _existing(session: Session, tenant_id: str, key: str, request_sha256: str) -> str | None:
    found = session.execute(
        select(Run.id, Run.request_sha256).where(
            Run.tenant_id == tenant_id, Run.idempotency_key == key
        )
    ).first()
    if found is None:
        return None
    if found[1] is not None and found[1] != request_sha256:
        raise Conflict(
            f"{key!r} was already used for a different request (run {found[0]}); use a new key",
            field="--idempotency-key",
        )
    return str(found[0])


_INSERT_RUN = (
    "INSERT INTO runs (id, tenant_id, principal_id, workflow, status, environment,"
    " classification, idempotency_key, on_behalf_of, spec, spec_sha256, inputs, request_sha256,"
    " created_at, updated_at) VALUES (%(id)s, %(tenant_id)s, %(principal_id)s, %(workflow)s,"
    " %(status)s, %(environment)s, %(classification)s, %(idempotency_key)s, %(on_behalf_of)s,"
    " %(spec)s, %(spec_sha256)s, %(inputs)s, %(request_sha256)s, %(created_at)s, %(updated_at)s)"
)


def _insert_run(run: Run) -> tuple[str, dict[str, Any]]:
    """The run's row as one statement (sent with the freeze's locks, not by a flush)."""
    values = {c.key: getattr(run, c.key) for c in Run.__table__.columns}
    for column in ("spec", "inputs"):  # JSONB, written as SQLAlchemy's type writes it
        values[column] = None if values[column] is None else Jsonb(values[column])
    values["status"] = str(values["status"])
    return _INSERT_RUN, values


def _request_sha256(request: RunRequest, inputs: dict[str, Any]) -> str:
    return digest(
        {
            "workflow": request.spec.sha256,
            "inputs": inputs,
            "environment": request.environment,
            "classification": request.classification,
            "on_behalf_of": request.on_behalf_of,
        }
    )


def _first_args(
    session: Session, gov: Governance, node_spec: Any, inputs: dict[str, Any], *, call: bool
) -> dict[str, Any]:
    """A node's arguments, known at submission (it needs nothing), checked against the
    tool's schema: bad ones are refused before anything is recorded."""
    where = "--arg" if call else f"node {node_spec.id}: args"
    args: dict[str, Any] = render(node_spec.args, inputs, {}, where=where)
    manifest = gov.manifests(session, node_spec.tool)
    assert manifest is not None  # checked by _check_request
    try:
        validate_args(manifest, args)
    except UsageError as e:
        if call:
            raise
        raise UsageError(f"node {node_spec.id}: {e}") from e
    return args


def check_run(
    session: Session,
    *,
    identity: Identity,
    request: RunRequest,
    gov: Governance,
    call: bool = False,
) -> None:
    """What :func:`submit_run` would refuse before recording anything, checked without
    recording anything (a batch checks every call before it submits any)."""
    inputs = coerce_inputs(request.spec, request.inputs)
    key = request.idempotency_key
    if key is not None and _existing(
        session, identity.tenant_id, key, _request_sha256(request, inputs)
    ):
        return  # the same request again: it returns its run
    _check_request(session, request, gov, call=call)
    for node_spec in request.spec.nodes:
        if not node_spec.needs:
            _first_args(session, gov, node_spec, inputs, call=call)


def submit_run(
    session: Session,
    *,
    identity: Identity,
    request: RunRequest,
    gov: Governance,
    call: bool = False,
) -> Submitted:
    """Record a run of ``request.spec``, decide its first nodes, stage what is allowed. Commits.

    Every line logged meanwhile carries the tenant (and a node's dispatch its ids)."""
    started_ns = time.time_ns()  # the intake span's start, once the run has its id
    with logfields.bound(tenant=identity.tenant_id):
        done = _submit(
            session, identity=identity, request=request, gov=gov, call=call, started_ns=started_ns
        )
        with logfields.bound(run_id=done.run_id):
            log.info("run.submitted created=%s staged=%s", done.created, len(done.outbox_ids))
        return done


def _submit(
    session: Session,
    *,
    identity: Identity,
    request: RunRequest,
    gov: Governance,
    call: bool,
    started_ns: int,
) -> Submitted:
    spec = request.spec
    inputs = coerce_inputs(spec, request.inputs)
    request_sha256 = _request_sha256(request, inputs)
    key = request.idempotency_key
    if key is not None and (run_id := _existing(session, identity.tenant_id, key, request_sha256)):
        return Submitted(run_id, (), created=False)
    _check_request(session, request, gov, call=call)

    now = datetime.now(UTC)
    run_id = f"run_{uuid.uuid4().hex[:24]}"
    run = Run(
        id=run_id,
        tenant_id=identity.tenant_id,
        principal_id=identity.principal_id,
        workflow=spec.name,
        status=RunStatus.RUNNING,
        environment=request.environment,
        classification=request.classification,
        idempotency_key=key,
        on_behalf_of=request.on_behalf_of,
        spec=spec.model_dump(mode="json"),
        spec_sha256=spec.sha256,
        inputs=inputs,
        request_sha256=request_sha256,
        created_at=now,
        updated_at=now,
    )
    nodes: dict[str, Node] = {}
    for order, node_spec in enumerate(spec.nodes):
        node = Node(
            run_id=run_id,
            node_id=node_spec.id,
            tool=node_spec.tool,
            needs=list(node_spec.needs),
            args_template=node_spec.args,
            status=NodeStatus.PENDING,
            attempt=0,
            max_attempts=1,
            created_at=now + order * _TICK,  # keeps the workflow's order in views
            updated_at=now,
        )
        if not node_spec.needs:  # its arguments are known now: refuse bad ones before anything
            node.args = _first_args(session, gov, node_spec, inputs, call=call)
            node.args_sha256 = digest(node.args)
        nodes[node.node_id] = node
    try:  # the run, then the freeze's locks and read for its first dispatch: one round trip
        active_freeze(session, identity.tenant_id, before=[_insert_run(run)])
    except IntegrityError:  # the same key, submitted at the same moment by someone else
        session.rollback()
        if key is not None and (
            found := _existing(session, identity.tenant_id, key, request_sha256)
        ):
            return Submitted(found, (), created=False)
        raise
    make_transient_to_detached(run)  # written above: later changes flush as updates
    session.add(run)
    session.add_all(nodes.values())
    events = [
        NewEvent(
            "RunSubmitted",
            {
                "run_id": run_id,
                "workflow": spec.name,
                "workflow_sha256": spec.sha256,
                "workflow_spec": None if call else spec.model_dump(mode="json"),
                "inputs": inputs,
                "principal": identity.principal,
                "role": identity.role.value,
                "on_behalf_of": request.on_behalf_of,
                "environment": request.environment,
                "classification": request.classification,
                "idempotency_key": key,
                "nodes": [
                    {
                        "node_id": n.node_id,
                        "tool": n.tool,
                        "needs": n.needs,
                        "args_sha256": n.args_sha256,
                    }
                    for n in nodes.values()
                ],
            },
            tenant_id=identity.tenant_id,
            run_id=run_id,
        )
    ]
    state = RunState(run=run, nodes=nodes, submitter=Submitter.of(identity))
    with (
        intake_span(run_id, start_ns=started_ns, workflow=spec.name, tenant=identity.tenant_id),
        dispatching(session, gov) as done,
    ):
        advance(session, gov, state, events, done, now=now)
        append_events(session, events)
        view = view_of(session, identity, run, list(nodes.values()))  # before the commit
    return Submitted(
        run_id, tuple(done.outbox_ids), created=True, view=view, staged=dict(done.staged)
    )
