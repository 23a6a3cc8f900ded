"""Signing in and out, the approvals inbox, and deciding a held call."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from control.api.console.guard import (
    COOKIE,
    PATH,
    PRE_COOKIE,
    SignInRequired,
    ViewerOf,
    form_of,
    new_pre_token,
    set_cookie,
    store_of,
    viewer,
)
from control.api.console.pages import ConsoleRoute, render
from control.api.console.sessions import IDLE_S
from control.api.console.views import held_calls, policy_notes
from control.errors import AuthError, UsageError, require_text
from control.governance.auth import APPROVERS, authenticate
from control.orchestration.runs import RunView

router = APIRouter(prefix=PATH, route_class=ConsoleRoute, include_in_schema=False)

__all__ = ["router"]

PAGE = 500
INBOX_RUNS = 5000  # the inbox reads at most this many held runs (and says so if cut)


@router.get("")
def home() -> Response:
    return RedirectResponse(f"{PATH}/inbox", 303)


@router.get("/sign-in")
def sign_in_page(request: Request, ended: int = 0) -> Response:
    try:
        viewer(request)
        return RedirectResponse(f"{PATH}/inbox", 303)  # already signed in
    except SignInRequired:
        pass
    pre = new_pre_token()
    message = "Your session has ended: sign in again." if ended else ""
    response = render(request, "signin.html", pre=pre, message=message)
    set_cookie(request, response, PRE_COOKIE, pre, max_age=1800)
    return response


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    form = await form_of(request, request.cookies.get(PRE_COOKIE))
    token = form.get("token", "").strip()
    plane = request.app.state.plane
    try:
        with plane.sessions() as db:
            authenticate(db, token)
    except AuthError as e:
        pre = new_pre_token()
        refused = render(request, "signin.html", code=401, pre=pre, message=str(e))
        set_cookie(request, refused, PRE_COOKIE, pre, max_age=1800)
        return refused
    session_id, _ = store_of(request).create(token)
    response = RedirectResponse(f"{PATH}/inbox", 303)
    set_cookie(request, response, COOKIE, session_id, max_age=IDLE_S)
    response.delete_cookie(PRE_COOKIE, path=PATH)
    return response


@router.post("/sign-out")
async def sign_out(request: Request, seen: ViewerOf) -> Response:
    await form_of(request, seen.csrf)
    store_of(request).delete(seen.session_id)
    response = RedirectResponse(f"{PATH}/sign-in", 303)
    response.delete_cookie(COOKIE, path=PATH)
    return response


@router.get("/inbox")
def inbox(request: Request, seen: ViewerOf) -> Response:
    ops = seen.ops
    identity = ops.identity
    bundle = ops.plane.policy.bundle
    waiting: list[RunView] = []
    while len(waiting) < INBOX_RUNS:  # every held run: the oldest expire first
        last = waiting[-1] if waiting else None
        before = (datetime.fromisoformat(last.created_at), last.run_id) if last else None
        page = ops.runs(awaiting_approval=True, limit=PAGE, before=before)
        waiting.extend(page)
        if len(page) < PAGE:
            break
    held = held_calls(
        waiting,
        principal=identity.principal,
        approver=identity.role in APPROVERS,
        role=identity.role.value,
        notes=policy_notes(bundle.policies_text),
    )
    cut = len(waiting) >= INBOX_RUNS
    return render(request, "inbox.html", held=held, version=bundle.version, cut=cut)


@router.post("/runs/{run_id}/nodes/{node_id}/decide")
async def decide(request: Request, run_id: str, node_id: str, seen: ViewerOf) -> Response:
    """Approve or reject a held call: the API's own approval logic decides who may."""
    form = await form_of(request, seen.csrf)
    action = form.get("action")
    reason = form.get("reason", "").strip() or None
    if reason is not None:
        require_text(reason, field="reason")
    if action == "approve":
        seen.ops.approve(run_id, node_id, reason=reason)
    elif action == "reject":
        if reason is None:
            raise UsageError("a rejection needs a reason", field="reason")
        seen.ops.reject(run_id, node_id, reason=reason)
    else:
        raise UsageError("must be approve or reject", field="action")
    return RedirectResponse(f"{PATH}/runs/{run_id}", 303)
