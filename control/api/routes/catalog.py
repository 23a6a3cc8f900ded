"""What can be called: the tools (their approved manifests and JSON Schemas, and what is
held), the operator's approval of a tool's manifest, and the workflows of the server's
workflows directory."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request

from control.api.deps import Caller
from control.api.models import ToolApprovedOut, ToolApproveIn, ToolOut, VerifyOut, WorkflowOut
from control.api.problems import problem_response
from control.errors import Forbidden, UsageError
from control.governance.auth import ADMINS, require_role
from control.orchestration.manifests import approve_manifest, list_tools
from control.orchestration.workflows import list_workflows, load_workflow

router = APIRouter(prefix="/v1", tags=["catalog"])

__all__ = ["router"]

VERIFY_RETRY_AFTER_S = 5


@router.get("/tools", response_model=list[ToolOut])
def tools(ops: Caller) -> list[dict[str, Any]]:
    """Every tool: the approved manifest in force (args and result schemas, limits, egress,
    the key that signed it), who approved it, and the manifests workers announced that are
    held (not approved: they change nothing). Policy still decides each call."""
    with ops.plane.sessions() as session:
        return list_tools(session)


@router.post("/tools/{name}/approve", response_model=ToolApprovedOut)
def approve_tool(name: str, body: ToolApproveIn, ops: Caller) -> ToolApprovedOut:
    """Approve the manifest a worker announced for tool `name` at `version` with digest
    `sha256` (an admin of an operator tenant): from now on the control uses its schema,
    limits and retries. Recorded as ToolApproved. 404 if no worker announced it; 409 if it
    cannot be approved (its schema: a pattern RE2 cannot compile, a size limit)."""
    identity = ops.identity
    require_role(identity, ADMINS, "approve tool manifests")
    if not identity.operator:
        raise Forbidden("approving a tool's manifest needs an admin of an operator tenant")
    by = f"{identity.tenant_name}/{identity.principal}"
    with ops.plane.sessions() as session:
        row = approve_manifest(
            session, tool=name, version=body.version, sha256=body.sha256, by=by, via="api"
        )
        session.commit()
        sha = row.manifest_sha256
    ops.plane.forget_manifests()
    return ToolApprovedOut(tool=name, version=body.version, manifest_sha256=sha, by=by)


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
