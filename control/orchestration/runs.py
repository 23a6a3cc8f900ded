"""Views of runs for one tenant: another tenant's runs do not exist here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select, tuple_
from sqlalchemy.orm import Session, aliased, defer

from control.errors import NotFound
from control.governance.auth import Identity
from control.orchestration.artifacts import Artifacts, node_result
from control.orchestration.states import NodeStatus, RunStatus
from ledger.models import Approval, Node, Principal, Run

__all__ = ["NodeView", "RunView", "get_run", "list_runs", "view_of"]


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


def _approval(approval: Approval, requested_by: str, decided_by: str | None) -> dict[str, Any]:
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


def _views(
    session: Session,
    identity: Identity,
    runs: list[tuple[Run, str]],
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
    nodes: dict[str, list[Node]] = {r.id: [] for r, _ in runs}
    ordered = select(Node).where(Node.run_id.in_(ids)).order_by(Node.created_at, Node.node_id)
    if summary:
        ordered = ordered.options(defer(Node.result), defer(Node.receipt), defer(Node.envelope))
    for node in session.scalars(ordered):
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
        approvals = _approvals(session, identity, [run.id])
    return _view(identity, run, identity.principal, nodes, approvals, False, None)


def _approvals(
    session: Session, identity: Identity, ids: list[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    requester, decider = aliased(Principal), aliased(Principal)
    return {
        (a.run_id, a.node_id): _approval(a, requested_by, decided_by)
        for a, requested_by, decided_by in session.execute(
            select(Approval, requester.name, decider.name)
            .join(requester, requester.id == Approval.requested_by)
            .outerjoin(decider, decider.id == Approval.decided_by)
            .where(Approval.run_id.in_(ids), Approval.tenant_id == identity.tenant_id)
        )
    }


def _view(
    identity: Identity,
    run: Run,
    submitter: str,
    nodes: list[Node],
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


def _with_submitter(identity: Identity) -> Select[tuple[Run, str]]:
    return (
        select(Run, Principal.name)
        .join(Principal, Principal.id == Run.principal_id)
        .where(Run.tenant_id == identity.tenant_id)
    )


def get_run(
    session: Session, identity: Identity, run_id: str, *, artifacts: Artifacts | None = None
) -> RunView:
    found = session.execute(_with_submitter(identity).where(Run.id == run_id)).first()
    if found is None:
        raise NotFound("run", run_id)
    return _views(session, identity, [(found[0], found[1])], artifacts=artifacts)[0]


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
    query = _with_submitter(identity)
    if awaiting_approval:
        query = query.where(Run.status == RunStatus.AWAITING_APPROVAL)
    if status is not None:
        query = query.where(Run.status == status)
    if ids is not None:
        query = query.where(Run.id.in_(ids))
    if before is not None:
        query = query.where(tuple_(Run.created_at, Run.id) < tuple_(*before))
    rows = session.execute(query.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)).all()
    rows_named = [(run, name) for run, name in rows]
    return _views(session, identity, rows_named, summary=summary, artifacts=artifacts)
