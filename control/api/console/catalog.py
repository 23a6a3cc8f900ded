"""Tools (their manifests and argument schemas) and the policy explain form."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from control.api.console.guard import PATH, ViewerOf, form_of
from control.api.console.pages import ConsoleRoute, render
from control.api.console.views import policy_notes
from control.api.models import ExplainIn
from control.api.routes.governance import explain as explain_call
from control.errors import UsageError
from control.orchestration.manifests import list_tools
from toolplane.canonical import CanonicalJSONError, parse_json_strict

router = APIRouter(prefix=PATH, route_class=ConsoleRoute, include_in_schema=False)

__all__ = ["router"]


@router.get("/tools")
def tools(request: Request, seen: ViewerOf) -> Response:
    with seen.ops.plane.sessions() as session:
        found = list_tools(session)
    rows = [
        {
            **tool,
            "args_schema": _json((tool["manifest"] or {}).get("args_schema")),
            "shown": _json(tool["manifest"]),
        }
        for tool in found
    ]
    return render(request, "tools.html", tools=rows)


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def _blank() -> dict[str, str]:
    return {"tool": "", "environment": "", "classification": "", "args": "{}", "on_behalf_of": ""}


@router.get("/explain")
def explain_page(request: Request, seen: ViewerOf) -> Response:
    return render(request, "explain.html", asked=_blank(), decision=None, problem="", notes={})


@router.post("/explain")
async def explain(request: Request, seen: ViewerOf) -> Response:
    """How the bundle in force decides a call (the API's own explain; nothing runs)."""
    form = await form_of(request, seen.csrf)
    asked = {k: form.get(k, "").strip() for k in _blank()}
    decision: dict[str, Any] | None = None
    problem = ""
    try:
        try:  # as the CLI's --arg: no duplicate keys, NaN or nesting past the limit
            args = parse_json_strict(asked["args"] or "{}")
        except CanonicalJSONError as e:
            raise UsageError(f"is not JSON ({e})", field="args") from e
        if not isinstance(args, dict):
            raise UsageError("must be a JSON object", field="args")
        body = ExplainIn(
            tool=asked["tool"],
            args=args,
            environment=asked["environment"] or None,
            classification=asked["classification"] or None,
            on_behalf_of=asked["on_behalf_of"] or None,
        )
        decision = explain_call(body, seen.ops)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "form"
        problem = f"{field}: {first['msg']}"
    except UsageError as e:
        problem = str(e)
    notes = policy_notes(seen.ops.plane.policy.bundle.policies_text)
    return render(
        request, "explain.html", asked=asked, decision=decision, problem=problem, notes=notes
    )
