"""Runs: the list, a run's page (its graph, live), its evidence timeline and its bundle."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from control.api.console.guard import PATH, ViewerOf
from control.api.console.pages import ConsoleRoute, render
from control.api.console.views import (
    RESULT_CHARS,
    graph_of,
    shown,
    timeline,
    timings,
)
from control.api.events import LAST_ID, event_stream
from control.api.routes.runs import after_cursor, cursor_of, evidence_of
from control.orchestration.bundles import export_bundle
from control.orchestration.states import TERMINAL_RUN, RunStatus

router = APIRouter(prefix=PATH, route_class=ConsoleRoute, include_in_schema=False)

__all__ = ["router"]

PAGE = 25


@router.get("/runs")
def runs(
    request: Request,
    seen: ViewerOf,
    status: Annotated[str, Query(max_length=40)] = "",
    cursor: Annotated[str, Query(max_length=400)] = "",
) -> Response:
    chosen = RunStatus(status) if status in {s.value for s in RunStatus} else None
    views = seen.ops.runs(
        limit=PAGE,
        status=chosen,
        before=after_cursor(cursor) if cursor else None,
        summary=True,
    )
    following = cursor_of(views[-1]) if len(views) == PAGE else None
    return render(
        request,
        "runs.html",
        runs=views,
        statuses=[s.value for s in RunStatus],
        status=chosen.value if chosen else "",
        next_cursor=following,
        first_page=not cursor,
    )


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: str, seen: ViewerOf) -> Response:
    run = seen.ops.run(run_id)  # NotFound unless it is this tenant's
    events = evidence_of(seen.ops, run_id)
    times = timings(events)
    nodes = []
    for node in run.nodes:
        result, cut = shown(node.result, RESULT_CHARS)
        args, args_cut = shown(node.args)
        nodes.append(
            {
                "view": node,
                "result": result,
                "result_cut": cut,
                "args": args,
                "args_cut": args_cut,
                "key_id": (node.receipt or {}).get("key_id")
                or times.get(node.node_id, {}).get("receipt_key_id"),
                "times": times.get(node.node_id, {}),
            }
        )
    return render(
        request,
        "run.html",
        run=run,
        nodes=nodes,
        graph=graph_of(run.nodes),
        live=run.status not in TERMINAL_RUN,
    )


@router.get("/runs/{run_id}/events")
async def run_events(
    request: Request,
    run_id: str,
    seen: ViewerOf,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=20, pattern=r"^[0-9]+$")
    ] = None,
) -> Response:
    """The API's event stream of the run, for the page's EventSource (same cookie); an
    EventSource that reconnects sends Last-Event-ID and gets only what it has not seen."""
    ops = seen.ops
    await run_in_threadpool(ops.run, run_id)  # NotFound unless it is this tenant's
    stream = event_stream(
        request.app.state.events,
        ops.plane.sessions,
        run_id,
        after=min(int(last_event_id or 0), LAST_ID),
        disconnected=request.is_disconnected,
        token_id=ops.identity.token_id,  # revoked or expired: the stream ends
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get("/runs/{run_id}/evidence")
def evidence(request: Request, run_id: str, seen: ViewerOf, verify: int = 0) -> Response:
    events = evidence_of(seen.ops, run_id)  # NotFound unless it is this tenant's
    report = None
    if verify:
        gate = request.app.state.verifying
        if not gate.acquire(blocking=False):
            return render(
                request,
                "problem.html",
                code=503,
                title="Busy",
                detail="A ledger verification is already running here; try again shortly.",
            )
        try:
            report = seen.ops.verify_ledger(run_id=run_id)
        finally:
            gate.release()
    rows = timeline(events, report)
    return render(
        request,
        "evidence.html",
        run_id=run_id,
        rows=rows,
        report=report,
        chain_problems=[b.problem for b in report.broken if b.event_id is None]
        if report is not None
        else [],
    )


@router.get("/runs/{run_id}/bundle")
def bundle(run_id: str, seen: ViewerOf) -> Response:
    """The run's offline evidence bundle, as `toolplane ledger export` writes it."""
    seen.ops.run(run_id)  # NotFound unless it is this tenant's
    data = export_bundle(seen.ops.plane, tenant_id=seen.ops.identity.tenant_id, run_id=run_id)
    safe = "".join(c for c in run_id if c.isalnum() or c in "-_")
    return Response(
        data,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{safe}.bundle.json"'},
    )
