"""What can be called: the registered tools (their signed manifests and JSON Schemas) and
the workflows of the server's workflows directory."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select

from control.api.deps import Caller
from control.api.models import ToolOut, VerifyOut, WorkflowOut
from control.api.problems import problem_response
from control.errors import UsageError
from control.orchestration.workflows import list_workflows, load_workflow
from ledger.models import ToolManifest

router = APIRouter(prefix="/v1", tags=["catalog"])

__all__ = ["router"]

VERIFY_RETRY_AFTER_S = 5


@router.get("/tools", response_model=list[ToolOut])
def tools(ops: Caller) -> list[dict[str, Any]]:
    """Every tool a worker has announced, with its manifest (args and result schemas,
    limits, egress) and the key that signed it. Policy still decides each call."""
    with ops.plane.sessions() as session:
        return [
            {
                "tool": row.tool,
                "version": row.version,
                "manifest": row.manifest,
                "manifest_sha256": row.manifest_sha256,
                "key_id": row.key_id,
                "registered_at": row.registered_at.isoformat(),
            }
            for row in session.scalars(select(ToolManifest).order_by(ToolManifest.tool))
        ]


@router.get("/workflows", response_model=list[WorkflowOut])
def workflows(ops: Caller) -> list[WorkflowOut]:
    """The workflows you can submit: inputs, nodes, and whether each one loads."""
    directory = ops.plane.settings.workflow_dir
    rows = []
    for name in list_workflows(directory):
        try:
            spec = load_workflow(directory, name)
        except UsageError as e:
            rows.append(WorkflowOut(name=name, ok=False, problem=str(e)))
            continue
        rows.append(
            WorkflowOut(
                name=name,
                ok=True,
                description=spec.description,
                inputs={k: v.type for k, v in spec.inputs.items()},
                nodes=[{"id": n.id, "tool": n.tool, "needs": list(n.needs)} for n in spec.nodes],
            )
        )
    return rows


@router.get("/ledger/verify", response_model=VerifyOut, tags=["ledger"])
def verify(request: Request, ops: Caller, run: str | None = None) -> Any:
    """Recompute every link, result hash and receipt of your tenant's evidence chain
    (`run`: name only that run's events). One verification at a time per API process (a
    long chain is verified by a pool of processes): another gets 503 with Retry-After."""
    gate: threading.BoundedSemaphore = request.app.state.verifying
    if not gate.acquire(blocking=False):
        return problem_response(
            503,
            "unavailable",
            "a ledger verification is already running in this API process; retry later",
            headers={"Retry-After": str(VERIFY_RETRY_AFTER_S)},
        )
    try:
        return ops.verify_ledger(run_id=run).as_dict()
    finally:
        gate.release()
