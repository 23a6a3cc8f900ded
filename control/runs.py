"""Views of runs for one tenant: another tenant's runs do not exist here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from control.auth import Identity
from control.errors import NotFound
from ledger.models import Node, Run, Tenant

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "tool": self.tool,
            "status": self.status,
            "attempt": self.attempt,
            "result": self.result,
            "result_sha256": self.result_sha256,
            "receipt": self.receipt,
            "error": self.error,
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tenant": self.tenant,
            "workflow": self.workflow,
            "status": self.status,
            "environment": self.environment,
            "classification": self.classification,
            "created_at": self.created_at,
            "nodes": [n.as_dict() for n in self.nodes],
        }


def _view(run: Run, tenant_name: str, nodes: list[Node]) -> RunView:
    return RunView(
        run_id=run.id,
        tenant=tenant_name,
        workflow=run.workflow,
        status=run.status,
        environment=run.environment,
        classification=run.classification,
        created_at=run.created_at.isoformat(),
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
            )
            for n in nodes
        ),
    )


def get_run(session: Session, identity: Identity, run_id: str) -> RunView:
    run = session.scalar(select(Run).where(Run.id == run_id, Run.tenant_id == identity.tenant_id))
    if run is None:
        raise NotFound("run", run_id)
    nodes = list(session.scalars(select(Node).where(Node.run_id == run.id).order_by(Node.node_id)))
    return _view(run, identity.tenant_name, nodes)


def list_runs(session: Session, identity: Identity, *, limit: int = 50) -> list[RunView]:
    runs = list(
        session.scalars(
            select(Run)
            .where(Run.tenant_id == identity.tenant_id)
            .order_by(Run.created_at.desc())
            .limit(limit)
        )
    )
    if not runs:
        return []
    nodes: dict[str, list[Node]] = {r.id: [] for r in runs}
    for node in session.scalars(select(Node).where(Node.run_id.in_(list(nodes)))):
        nodes[node.run_id].append(node)
    tenant = session.get(Tenant, identity.tenant_id)
    name = tenant.name if tenant else identity.tenant_name
    return [_view(r, name, sorted(nodes[r.id], key=lambda n: n.node_id)) for r in runs]
