"""Runs: submit a call, a batch of calls or a workflow; read, list, follow and cancel runs;
approve or reject a node; a run's evidence."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from control.api.deps import Caller
from control.api.events import LAST_ID, event_stream
from control.api.fields import api_field
from control.api.models import (
    BatchIn,
    BatchOut,
    CallIn,
    CancelIn,
    DecidedOut,
    DecisionIn,
    EvidenceOut,
    RejectIn,
    RunOut,
    RunPage,
    WorkflowIn,
)
from control.errors import Conflict, UsageError
from control.governance.approvals import Decided
from control.orchestration.operations import Operations
from control.orchestration.runs import RunView, require_run
from control.orchestration.states import RunStatus
from control.orchestration.validation import check_json
from ledger.models import EvidenceEvent

router = APIRouter(prefix="/v1", tags=["runs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="The same key with the same body returns the same run; with another body, 409",
    ),
]

__all__ = ["after_cursor", "cursor_of", "evidence_of", "router"]


def out(view: RunView) -> RunOut:
    return RunOut.model_validate(view.as_dict())


def _key(header: str | None, body: str | None) -> str | None:
    if header is not None and body is not None and header != body:
        raise UsageError("differs from the Idempotency-Key header", field="idempotency_key")
    return header if header is not None else body


def _submit_call(ops: Operations, call: CallIn, key: str | None) -> RunOut:
    check_json(call.args, "--arg")
    return out(
        ops.submit_call(
            call.tool,
            call.args,
            environment=call.environment,
            classification=call.classification,
            idempotency_key=key,
            on_behalf_of=call.on_behalf_of,
        )
    )


@router.post("/calls", status_code=status.HTTP_201_CREATED, response_model=RunOut)
def submit_call(body: CallIn, ops: Caller, idempotency_key: IdempotencyKey = None) -> RunOut:
    """Submit one tool call (a run of one node). A denial is a run with status `denied`."""
    return _submit_call(ops, body, _key(idempotency_key, body.idempotency_key))


@contextlib.contextmanager
def _item(index: int) -> Iterator[None]:
    """A batch's problem names the call at fault: ``calls.2.args.query``."""
    try:
        yield
    except UsageError as e:  # Conflict too, keeping its type
        field = f"calls.{index}." + (api_field(str(e.field)) if e.field else "")
        raise type(e)(e.rule, field=field.rstrip(".")) from e


@router.post("/calls/batch", status_code=status.HTTP_201_CREATED, response_model=BatchOut)
def submit_calls(body: BatchIn, ops: Caller) -> BatchOut:
    """Submit up to 100 calls at once; each is decided on its own (its own run), in order.
    Each call may carry its own `idempotency_key`. Every call is checked (tool, arguments,
    labels, keys) before any is submitted: a batch refused with 422 or 409 ran nothing."""
    keyed: dict[str, CallIn] = {}
    for index, call in enumerate(body.calls):
        with _item(index):
            key = call.idempotency_key
            if key is not None and keyed.setdefault(key, call) != call:
                raise Conflict(
                    f"{key!r} is used for another call of this batch", field="--idempotency-key"
                )
            check_json(call.args, "--arg")
            ops.check_call(
                call.tool,
                call.args,
                environment=call.environment,
                classification=call.classification,
                idempotency_key=call.idempotency_key,
                on_behalf_of=call.on_behalf_of,
            )
    runs = []
    for index, call in enumerate(body.calls):
        with _item(index):
            runs.append(_submit_call(ops, call, call.idempotency_key))
    return BatchOut(runs=runs)


@router.post("/runs", status_code=status.HTTP_201_CREATED, response_model=RunOut)
def submit_workflow(
    body: WorkflowIn, ops: Caller, idempotency_key: IdempotencyKey = None
) -> RunOut:
    """Start a run of a workflow of the server's workflows directory."""
    check_json(body.inputs, "--input")
    return out(
        ops.start_workflow(
            body.workflow,
            body.inputs,
            environment=body.environment,
            classification=body.classification,
            idempotency_key=idempotency_key,
            on_behalf_of=body.on_behalf_of,
        )
    )


def cursor_of(view: RunView) -> str:
    """The cursor that continues a list of runs after ``view`` (opaque to callers)."""
    raw = json.dumps([view.created_at, view.run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def after_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, run id) a cursor continues after; 422 naming `cursor` if bad."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, run_id = json.loads(raw)
        return datetime.fromisoformat(created_at), str(run_id)
    except (binascii.Error, ValueError, TypeError) as e:
        raise UsageError("is not a cursor this API returned", field="cursor") from e


@router.get("/runs", response_model=RunPage)
def list_runs(
    ops: Caller,
    status_: Annotated[RunStatus | None, Query(alias="status")] = None,
    awaiting_approval: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    run_id: Annotated[list[str] | None, Query(alias="id", max_length=1000)] = None,
) -> RunPage:
    """Your tenant's runs, newest first; `next_cursor` continues the list. Each node comes
    without its result and receipt (`result` and `receipt` are null; `result_sha256` is
    there): `GET /v1/runs/{run_id}` has them."""
    views = ops.runs(
        limit=limit,
        awaiting_approval=awaiting_approval,
        status=status_,
        before=after_cursor(cursor) if cursor else None,
        ids=run_id,
        summary=True,
    )
    following = cursor_of(views[-1]) if len(views) == limit else None
    return RunPage(runs=[out(v) for v in views], next_cursor=following)


@router.get("/runs/{run_id}", response_model=RunOut)
def get_run(run_id: str, ops: Caller) -> RunOut:
    """One run of your tenant with its nodes, results and receipts."""
    return out(ops.run(run_id))


@router.get(
    "/runs/{run_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "The event stream"}},
)
async def follow_run(
    run_id: str,
    request: Request,
    ops: Caller,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=20, pattern=r"^[0-9]+$")
    ] = None,
) -> StreamingResponse:
    """Server-Sent Events: each status change of the run (`event: run`) and of its nodes
    (`event: node`), in commit order, each with its id; `event: end` once the run ended.
    Reconnect with `Last-Event-ID` to get what you have not seen."""

    def visible() -> None:  # 404 unless it is this tenant's (no view: the stream reads)
        with ops.reads() as session:
            require_run(session, ops.identity, run_id)

    await run_in_threadpool(visible)
    stream = event_stream(
        request.app.state.events,
        ops.reads,
        run_id,
        after=min(int(last_event_id or 0), LAST_ID),  # no id is larger (bigint)
        disconnected=request.is_disconnected,
        token_id=ops.identity.token_id,
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.post("/runs/{run_id}/cancel", response_model=RunOut)
def cancel_run(run_id: str, ops: Caller, body: CancelIn | None = None) -> RunOut:
    """Cancel a run (its submitter or an admin): nothing more is dispatched."""
    return out(ops.cancel(run_id, reason=body.reason if body else None))


def _decided(ops: Operations, decided: Decided) -> DecidedOut:
    return DecidedOut(
        run_id=decided.run_id,
        node_id=decided.node_id,
        approval_id=decided.approval_id,
        status=decided.status,
        message=decided.message,
        run=out(ops.run(decided.run_id)),
    )


@router.post("/runs/{run_id}/nodes/{node_id}/approve", response_model=DecidedOut)
def approve(run_id: str, node_id: str, ops: Caller, body: DecisionIn | None = None) -> DecidedOut:
    """Approve a node that waits for approval (approver role; never its submitter)."""
    return _decided(ops, ops.approve(run_id, node_id, reason=body.reason if body else None))


@router.post("/runs/{run_id}/nodes/{node_id}/reject", response_model=DecidedOut)
def reject(run_id: str, node_id: str, body: RejectIn, ops: Caller) -> DecidedOut:
    """Reject a node that waits for approval; it is denied."""
    return _decided(ops, ops.reject(run_id, node_id, reason=body.reason))


@router.get("/runs/{run_id}/evidence", response_model=list[EvidenceOut])
def run_evidence(run_id: str, ops: Caller) -> list[dict[str, Any]]:
    """The run's evidence events, in chain order."""
    return evidence_of(ops, run_id)


def evidence_of(ops: Operations, run_id: str) -> list[dict[str, Any]]:
    """A run of the caller's tenant's evidence events, in chain order (NotFound otherwise)."""
    ops.run(run_id)  # 404 unless it is this tenant's
    tenant_id = ops.identity.tenant_id
    with ops.plane.sessions() as session:
        rows = session.scalars(
            select(EvidenceEvent)
            .where(EvidenceEvent.run_id == run_id, EvidenceEvent.tenant_id == tenant_id)
            .order_by(EvidenceEvent.chain_id, EvidenceEvent.seq)
        )
        return [
            {
                "id": e.id,
                "chain_id": e.chain_id,
                "seq": e.seq,
                "kind": e.kind,
                "run_id": e.run_id,
                "payload": e.payload,
                "created_at": e.created_at.isoformat(),
                "prev_hash": e.prev_hash,
                "hash": e.hash,
            }
            for e in rows
        ]
