"""Views of runs for one tenant: another tenant's runs do not exist here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, Select, bindparam, select, tuple_
from sqlalchemy.orm import Session

from control.errors import NotFound
from control.governance.auth import Identity
from control.orchestration.artifacts import Artifacts, node_result
from control.orchestration.states import NodeStatus, RunStatus
from ledger.models import Approval, Node, Principal, Run

__all__ = ["NodeView", "RunView", "get_run", "list_runs", "require_run", "view_of"]


@dataclass(frozen=True)
class NodeView:
    node_id: str
    tool: str
    status: str
    attempt: int
    result: dict[str, Any] | None
    result_sha256: str | None
    receipt: dict[str, Any] | None
    error: dict[str, Any] | None
    args: dict[str, Any] | None
    approval: dict[str, Any] | None = None
    needs: tuple[str, ...] = ()
    artifact: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "tool": self.tool,
            "status": self.status,
            "needs": list(self.needs),
            "attempt": self.attempt,
            "args": self.args,
            "result": self.result,
            "result_sha256": self.result_sha256,
            "artifact": self.artifact,
            "receipt": self.receipt,
            "error": self.error,
            "approval": self.approval,
        }


@dataclass(frozen=True)
class RunView:
    run_id: str
    tenant: str
    workflow: str
    status: str
    environment: str
    classification: str
    created_at: str
    nodes: tuple[NodeView, ...]
    submitter: str = ""
    on_behalf_of: str | None = None
    inputs: dict[str, Any] | None = None
    idempotency_key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tenant": self.tenant,
            "workflow": self.workflow,
            "status": self.status,
            "inputs": self.inputs,
            "idempotency_key": self.idempotency_key,
            "environment": self.environment,
            "classification": self.classification,
            "submitter": self.submitter,
            "on_behalf_of": self.on_behalf_of,
            "created_at": self.created_at,
            "nodes": [n.as_dict() for n in self.nodes],
        }


def _approval(approval: Any, requested_by: str, decided_by: str | None) -> dict[str, Any]:
    return {
        "approval_id": approval.id,
        "status": approval.status,
        "requested_by": requested_by,
        "expires_at": approval.expires_at.astimezone(UTC).isoformat(),
        "policies": approval.policies,
        "policy_version": approval.policy_version,
        "args_sha256": approval.args_sha256,
        "decided_by": decided_by,
        "reason": approval.reason,
    }


# The statements of the read side, built once (Core, only the columns a view shows): a
# view is read for every waiter, and building ORM statements anew each time was the API's
# largest cost after submission.
_RUNS, _NODES = Run.__table__, Node.__table__
_APPROVALS, _PRINCIPALS = Approval.__table__, Principal.__table__
_NODE_COLUMNS = tuple(
    _NODES.c[name]
    for name in (
        "run_id", "node_id", "tool", "status", "attempt", "result_sha256", "artifact", "error",
        "args", "needs", "created_at",
    )
)  # fmt: skip
_IDS = bindparam("ids", expanding=True)
_TENANT = bindparam("tenant_id")
_NODES_OF = {
    summary: select(*_NODE_COLUMNS, *(() if summary else (_NODES.c.result, _NODES.c.receipt)))
    .where(_NODES.c.run_id.in_(_IDS))
    .order_by(_NODES.c.created_at, _NODES.c.node_id)
    for summary in (False, True)
}
_APPROVAL_COLUMNS = (
    "id", "run_id", "node_id", "status", "expires_at", "policies", "policy_version",
    "args_sha256", "reason",
)  # fmt: skip
_REQUESTER, _DECIDER = _PRINCIPALS.alias("requester"), _PRINCIPALS.alias("decider")
_APPROVALS_OF = (
    select(
        *(_APPROVALS.c[name] for name in _APPROVAL_COLUMNS),
        _REQUESTER.c.name.label("requested_by_name"),
        _DECIDER.c.name.label("decided_by_name"),
    )
    .select_from(
        _APPROVALS.join(_REQUESTER, _REQUESTER.c.id == _APPROVALS.c.requested_by).outerjoin(
            _DECIDER, _DECIDER.c.id == _APPROVALS.c.decided_by
        )
    )
    .where(_APPROVALS.c.run_id.in_(_IDS), _APPROVALS.c.tenant_id == _TENANT)
)
_RUN_COLUMNS = tuple(
    _RUNS.c[name]
    for name in (
        "id", "workflow", "status", "environment", "classification", "created_at",
        "on_behalf_of", "inputs", "idempotency_key",
    )
)  # fmt: skip
_WITH_SUBMITTER = (
    select(*_RUN_COLUMNS, _PRINCIPALS.c.name.label("submitter"))
    .select_from(_RUNS.join(_PRINCIPALS, _PRINCIPALS.c.id == _RUNS.c.principal_id))
    .where(_RUNS.c.tenant_id == _TENANT)
)
_ONE_RUN = _WITH_SUBMITTER.where(_RUNS.c.id == bindparam("run_id"))


def _views(
    session: Session,
    identity: Identity,
    runs: list[tuple[Any, str]],
    *,
    summary: bool = False,
    artifacts: Artifacts | None = None,
) -> list[RunView]:
    """Views of runs (each with its submitter's name): one query for the nodes, one for
    the approvals with their principals' names. A ``summary`` leaves out (and does not
    load) each node's result and receipt: a list of runs is not a way to read results."""
    if not runs:
        return []
    ids = [r.id for r, _ in runs]
    nodes: dict[str, list[Any]] = {r.id: [] for r, _ in runs}
    for node in session.execute(_NODES_OF[summary], {"ids": ids}):
        nodes[node.run_id].append(node)
    approvals = _approvals(session, identity, ids)
    return [
        _view(identity, run, submitter, nodes[run.id], approvals, summary, artifacts)
        for run, submitter in runs
    ]


def view_of(session: Session, identity: Identity, run: Run, nodes: list[Node]) -> RunView:
    """The view of a run this transaction has just written, from the rows in hand (before
    the commit, which expires them): what :func:`get_run` would read after it, with no
    query unless a node waits for an approval."""
    approvals: dict[tuple[str, str], dict[str, Any]] = {}
    if any(n.status in (NodeStatus.AWAITING_APPROVAL, NodeStatus.CANCELLED) for n in nodes):
        session.flush()  # the approval requested in this transaction (Core reads do not flush)
        approvals = _approvals(session, identity, [run.id])
    return _view(identity, run, identity.principal, nodes, approvals, False, None)


def _approvals(
    session: Session, identity: Identity, ids: list[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (a.run_id, a.node_id): _approval(a, a.requested_by_name, a.decided_by_name)
        for a in session.execute(_APPROVALS_OF, {"ids": ids, "tenant_id": identity.tenant_id})
    }


def _view(
    identity: Identity,
    run: Any,  # a Run, or a row of its columns
    submitter: str,
    nodes: list[Any],  # Nodes, or rows of their columns
    approvals: dict[tuple[str, str], dict[str, Any]],
    summary: bool,
    artifacts: Artifacts | None,
) -> RunView:
    """A run's view; a node's artifact is read from the store and checked (ArtifactInvalid
    names the one that is missing or changed)."""
    return RunView(
        run_id=run.id,
        tenant=identity.tenant_name,
        workflow=run.workflow,
        status=run.status,
        environment=run.environment,
        classification=run.classification,
        created_at=run.created_at.astimezone(UTC).isoformat(),
        submitter=submitter,
        on_behalf_of=run.on_behalf_of,
        inputs=run.inputs,
        idempotency_key=run.idempotency_key,
        nodes=tuple(
            NodeView(
                node_id=n.node_id,
                tool=n.tool,
                status=n.status,
                attempt=n.attempt,
                result=None if summary else node_result(artifacts, n),
                result_sha256=n.result_sha256,
                artifact=n.artifact,
                receipt=None if summary else n.receipt,
                error=n.error,
                args=n.args,
                approval=approvals.get((run.id, n.node_id)),
                needs=tuple(n.needs or ()),
            )
            for n in nodes
        ),
    )


def _runs_query(*, awaiting_approval: bool, status: bool, ids: bool, before: bool) -> Select[Any]:
    """The statement that lists runs with these filters (bound parameters; built once)."""
    found = _RUNS_QUERIES.get((awaiting_approval, status, ids, before))
    if found is not None:
        return found
    query = _WITH_SUBMITTER
    if awaiting_approval:
        query = query.where(_RUNS.c.status == RunStatus.AWAITING_APPROVAL.value)
    if status:
        query = query.where(_RUNS.c.status == bindparam("status"))
    if ids:
        query = query.where(_RUNS.c.id.in_(bindparam("run_ids", expanding=True)))
    if before:
        query = query.where(
            tuple_(_RUNS.c.created_at, _RUNS.c.id)
            < tuple_(
                bindparam("before_at", type_=_RUNS.c.created_at.type),
                bindparam("before_id", type_=_RUNS.c.id.type),
            )
        )
    query = query.order_by(_RUNS.c.created_at.desc(), _RUNS.c.id.desc()).limit(
        bindparam("limit", type_=Integer)
    )
    _RUNS_QUERIES[(awaiting_approval, status, ids, before)] = query
    return query


_RUNS_QUERIES: dict[tuple[bool, bool, bool, bool], Select[Any]] = {}


_EXISTS = select(_RUNS.c.id).where(_RUNS.c.tenant_id == _TENANT, _RUNS.c.id == bindparam("run_id"))


def require_run(session: Session, identity: Identity, run_id: str) -> None:
    """Raise NotFound unless the run is this tenant's (one indexed read, no view)."""
    found = session.execute(_EXISTS, {"tenant_id": identity.tenant_id, "run_id": run_id})
    if found.first() is None:
        raise NotFound("run", run_id)


def get_run(
    session: Session, identity: Identity, run_id: str, *, artifacts: Artifacts | None = None
) -> RunView:
    found = session.execute(_ONE_RUN, {"tenant_id": identity.tenant_id, "run_id": run_id}).first()
    if found is None:
        raise NotFound("run", run_id)
    return _views(session, identity, [(found, found.submitter)], artifacts=artifacts)[0]


def list_runs(
    session: Session,
    identity: Identity,
    *,
    limit: int = 50,
    awaiting_approval: bool = False,
    status: RunStatus | None = None,
    before: tuple[datetime, str] | None = None,
    ids: list[str] | None = None,
    summary: bool = False,
    artifacts: Artifacts | None = None,
) -> list[RunView]:
    """The tenant's runs, newest first; ``before`` (created_at, run id) continues a page."""
    query = _runs_query(
        awaiting_approval=awaiting_approval,
        status=status is not None,
        ids=ids is not None,
        before=before is not None,
    )
    values: dict[str, Any] = {"tenant_id": identity.tenant_id, "limit": limit}
    if status is not None:
        values["status"] = str(status.value if isinstance(status, RunStatus) else status)
    if ids is not None:
        values["run_ids"] = list(ids)
    if before is not None:
        values["before_at"], values["before_id"] = before
    rows = session.execute(query, values).all()
    views = [(row, row.submitter) for row in rows]
    return _views(session, identity, views, summary=summary, artifacts=artifacts)
