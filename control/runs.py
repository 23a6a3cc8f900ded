"""Views of runs for one tenant: another tenant's runs do not exist here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from control.auth import Identity
from control.errors import NotFound
from control.states import RunStatus
from ledger.models import Approval, Node, Principal, Run

__all__ = ["NodeView", "RunView", "get_run", "list_runs"]


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
    args: dict[str, Any]
    approval: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "tool": self.tool,
            "status": self.status,
            "attempt": self.attempt,
            "args": self.args,
            "result": self.result,
            "result_sha256": self.result_sha256,
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tenant": self.tenant,
            "workflow": self.workflow,
            "status": self.status,
            "environment": self.environment,
            "classification": self.classification,
            "submitter": self.submitter,
            "on_behalf_of": self.on_behalf_of,
            "created_at": self.created_at,
            "nodes": [n.as_dict() for n in self.nodes],
        }


def _approval(approval: Approval | None, names: dict[str, str]) -> dict[str, Any] | None:
    if approval is None:
        return None
    return {
        "approval_id": approval.id,
        "status": approval.status,
        "requested_by": names.get(approval.requested_by, approval.requested_by),
        "expires_at": approval.expires_at.isoformat(),
        "policies": approval.policies,
        "policy_version": approval.policy_version,
        "args_sha256": approval.args_sha256,
        "decided_by": names.get(approval.decided_by or "", approval.decided_by),
        "reason": approval.reason,
    }


def _views(session: Session, identity: Identity, runs: list[Run]) -> list[RunView]:
    if not runs:
        return []
    ids = [r.id for r in runs]
    nodes: dict[str, list[Node]] = {r.id: [] for r in runs}
    for node in session.scalars(select(Node).where(Node.run_id.in_(ids)).order_by(Node.node_id)):
        nodes[node.run_id].append(node)
    approvals = {
        (a.run_id, a.node_id): a
        for a in session.scalars(select(Approval).where(Approval.run_id.in_(ids)))
    }
    principal_ids = {r.principal_id for r in runs} | {
        pid for a in approvals.values() for pid in (a.requested_by, a.decided_by) if pid
    }
    names = dict(
        session.execute(
            select(Principal.id, Principal.name).where(
                Principal.id.in_(principal_ids), Principal.tenant_id == identity.tenant_id
            )
        ).all()
    )
    return [
        RunView(
            run_id=run.id,
            tenant=identity.tenant_name,
            workflow=run.workflow,
            status=run.status,
            environment=run.environment,
            classification=run.classification,
            created_at=run.created_at.isoformat(),
            submitter=names.get(run.principal_id, ""),
            on_behalf_of=run.on_behalf_of,
            nodes=tuple(
                NodeView(
                    node_id=n.node_id,
                    tool=n.tool,
                    status=n.status,
                    attempt=n.attempt,
                    result=n.result,
                    result_sha256=n.result_sha256,
                    receipt=n.receipt,
                    error=n.error,
                    args=n.args,
                    approval=_approval(approvals.get((run.id, n.node_id)), names),
                )
                for n in nodes[run.id]
            ),
        )
        for run in runs
    ]


def get_run(session: Session, identity: Identity, run_id: str) -> RunView:
    run = session.scalar(select(Run).where(Run.id == run_id, Run.tenant_id == identity.tenant_id))
    if run is None:
        raise NotFound("run", run_id)
    return _views(session, identity, [run])[0]


def list_runs(
    session: Session, identity: Identity, *, limit: int = 50, awaiting_approval: bool = False
) -> list[RunView]:
    query = select(Run).where(Run.tenant_id == identity.tenant_id)
    if awaiting_approval:
        query = query.where(Run.status == RunStatus.AWAITING_APPROVAL)
    runs = list(session.scalars(query.order_by(Run.created_at.desc()).limit(limit)))
    return _views(session, identity, runs)
