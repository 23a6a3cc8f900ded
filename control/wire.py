"""The API's requests as the clients send them, and its problems as the clients raise them.

Both clients (sync and async) build the same :class:`ApiRequest` values here and only
differ in how they send them; a problem response becomes the same exception the
control raised, so the CLI shows one line and exits with the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter

from control.api.models import (
    BatchOut,
    DecidedOut,
    EvidenceOut,
    FreezeOut,
    IssuedTokenOut,
    RunOut,
    RunPage,
    StatusOut,
    TokenOut,
    ToolOut,
    VerifyOut,
    WorkflowOut,
)
from control.errors import (
    ArtifactInvalid,
    AuthError,
    Conflict,
    ControlError,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    UsageError,
)

__all__ = ["ApiRequest", "Requests", "path_segment", "parsed", "raise_for_problem", "unreachable"]


def _nothing(response: httpx.Response) -> None:
    return None


def _model(adapter: Any) -> Callable[[httpx.Response], Any]:
    return lambda response: adapter.validate_json(response.content)


def _of(model: Any) -> Callable[[httpx.Response], Any]:
    return _model(TypeAdapter(model))


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    body: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _call_body(tool: str, args: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    known = {"environment", "classification", "on_behalf_of", "idempotency_key"}
    unknown = set(options) - known
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(sorted(unknown))}", field="call")
    return _drop_none({"tool": tool, "args": args, **options})


class Requests:
    """How each operation of the API is asked for (shared by Client and AsyncClient)."""

    def r_call(self, tool: str, args: dict[str, Any], **options: Any) -> ApiRequest:
        body = _call_body(tool, args, options)
        key = body.pop("idempotency_key", None)
        headers = {"Idempotency-Key": key} if key else {}
        return ApiRequest("POST", "/v1/calls", _of(RunOut), body, headers=headers)

    def r_batch(self, calls: list[dict[str, Any]]) -> ApiRequest:
        body = {
            "calls": [
                _call_body(
                    c["tool"],
                    c.get("args", {}),
                    {k: v for k, v in c.items() if k not in {"tool", "args"}},
                )
                for c in calls
            ]
        }
        adapter = TypeAdapter(BatchOut)
        return ApiRequest(
            "POST", "/v1/calls/batch", lambda r: adapter.validate_json(r.content).runs, body
        )

    def r_workflow(
        self,
        workflow: str,
        inputs: dict[str, Any] | None,
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> ApiRequest:
        body = _drop_none({"workflow": workflow, "inputs": dict(inputs or {}), **options})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return ApiRequest("POST", "/v1/runs", _of(RunOut), body, headers=headers)

    def r_run(self, run_id: str) -> ApiRequest:
        return ApiRequest("GET", f"/v1/runs/{path_segment(run_id, 'run')}", _of(RunOut))

    def r_runs(
        self,
        *,
        limit: int = 50,
        status: str | None = None,
        awaiting_approval: bool = False,
        cursor: str | None = None,
        ids: list[str] | None = None,
    ) -> ApiRequest:
        params = _drop_none(
            {
                "limit": limit,
                "status": status,
                "awaiting_approval": "true" if awaiting_approval else None,
                "cursor": cursor,
                "id": ids,
            }
        )
        return ApiRequest("GET", "/v1/runs", _of(RunPage), params=params)

    def r_cancel(self, run_id: str, reason: str | None) -> ApiRequest:
        path = f"/v1/runs/{path_segment(run_id, 'run')}/cancel"
        return ApiRequest("POST", path, _of(RunOut), _drop_none({"reason": reason}))

    def r_decide(self, run_id: str, node_id: str, verb: str, reason: str | None) -> ApiRequest:
        path = (
            f"/v1/runs/{path_segment(run_id, 'run')}/nodes/{path_segment(node_id, 'node')}/{verb}"
        )
        return ApiRequest("POST", path, _of(DecidedOut), _drop_none({"reason": reason}))

    def r_evidence(self, run_id: str) -> ApiRequest:
        path = f"/v1/runs/{path_segment(run_id, 'run')}/evidence"
        return ApiRequest("GET", path, _of(list[EvidenceOut]))

    def r_issue(
        self, principal: str, role: str, expires_in_s: int | None, environment: str | None
    ) -> ApiRequest:
        body = _drop_none(
            {
                "principal": principal,
                "role": role,
                "expires_in_s": expires_in_s,
                "environment": environment,
            }
        )
        return ApiRequest("POST", "/v1/tokens", _of(IssuedTokenOut), body)

    def r_tokens(self) -> ApiRequest:
        return ApiRequest("GET", "/v1/tokens", _of(list[TokenOut]))

    def r_revoke(self, token_id: str) -> ApiRequest:
        return ApiRequest("DELETE", f"/v1/tokens/{path_segment(token_id, 'token')}", _nothing)

    def r_freeze(self, verb: str, everything: bool, reason: str) -> ApiRequest:
        body = {"reason": reason, "all": everything}
        return ApiRequest("POST", f"/v1/{verb}", _of(list[FreezeOut]), body)

    def r_freezes(self) -> ApiRequest:
        return ApiRequest("GET", "/v1/freezes", _of(list[FreezeOut]))

    def r_policy(self) -> ApiRequest:
        return ApiRequest("GET", "/v1/policy", _of(StatusOut))

    def r_explain(self, tool: str, args: dict[str, Any] | None, **options: Any) -> ApiRequest:
        body = _drop_none({"tool": tool, "args": dict(args or {}), **options})
        return ApiRequest("POST", "/v1/policy/explain", _of(dict[str, Any]), body)

    def r_tools(self) -> ApiRequest:
        return ApiRequest("GET", "/v1/tools", _of(list[ToolOut]))

    def r_workflows(self) -> ApiRequest:
        return ApiRequest("GET", "/v1/workflows", _of(list[WorkflowOut]))

    def r_bundle(self, run_id: str) -> ApiRequest:
        path = f"/v1/runs/{path_segment(run_id, 'run')}/bundle"
        return ApiRequest("GET", path, lambda response: response.content)

    def r_verify(self, run_id: str | None) -> ApiRequest:
        params = _drop_none({"run": run_id})
        return ApiRequest("GET", "/v1/ledger/verify", _of(VerifyOut), params=params)


def path_segment(value: str, what: str) -> str:
    """An id as one path segment: an id with a slash or a dot-segment names nothing."""
    if value in ("", ".", ".."):
        raise NotFound(what, value)
    return quote(value, safe="")


def unreachable(url: str, error: Exception) -> ServiceUnavailable:
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ServiceUnavailable("api", f"cannot reach {url}: {first}")


def parsed(request: ApiRequest, response: httpx.Response) -> Any:
    """The answer as the operation's model; an answer that is not one (a proxy's page, a
    captive portal, another service at that URL) is one error naming what came back."""
    try:
        return request.parse(response)
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        kind = response.headers.get("content-type", "no content type")
        raise ControlError(
            f"the API answered {response.status_code} ({kind}) to {request.method} "
            f"{request.path} with a body this client cannot read; is TOOLPLANE_URL the API?"
        ) from e


def raise_for_problem(response: httpx.Response) -> None:
    """Raise what the server raised, from its problem details (or say what came back)."""
    if response.status_code < 400:
        return
    if not response.is_closed:
        response.read()
    try:
        problem = response.json()
        detail, code, where = problem["detail"], problem.get("code"), problem.get("field")
    except (ValueError, KeyError, TypeError):
        raise ControlError(
            f"the API answered {response.status_code} without problem details"
        ) from None
    status = response.status_code
    if where and isinstance(detail, str) and detail.startswith(f"{where}: "):
        detail = detail[len(where) + 2 :]  # UsageError puts the field back in front
    if status == 401:
        raise AuthError(detail)
    if status == 403:
        raise Forbidden(detail)
    if status == 404:
        raise NotFound.from_detail(detail)
    if status == 409 and code == "artifact_invalid":
        raise ArtifactInvalid(detail)
    if status == 409 and code == "idempotency_conflict":
        raise Conflict(detail, field=where)
    if status in (409, 413, 422):
        raise UsageError(detail, field=where)
    if status == 503:
        raise ServiceUnavailable("control", detail)
    raise ControlError(f"the API failed ({status} {code}): {detail}")
