"""Errors as RFC 9457 problem details (``application/problem+json``) with a stable code.

Every error the API returns goes through here: the control's own errors, request
validation, bodies over the limit, unknown routes, and (logged with its traceback,
never shown) anything unexpected.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control.api.fields import api_field
from control.errors import (
    ArtifactInvalid,
    AuthError,
    Conflict,
    ControlError,
    Denied,
    Forbidden,
    ManifestRefused,
    NotFound,
    ServiceUnavailable,
    UsageError,
)
from control.governance.approvals import ApprovalRefused
from ledger.errors import StoreUnavailable
from toolplane.errors import ToolplaneError, first_problem

log = logging.getLogger("toolplane.api")

MEDIA_TYPE = "application/problem+json"

__all__ = [
    "BodyLimit",
    "MEDIA_TYPE",
    "PROBLEMS",
    "install_problem_handlers",
    "problem_response",
]

_PROBLEM_CONTENT = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"description": TITLE, "content": _PROBLEM_CONTENT}
    for status, TITLE in (
        (401, "No token, or a bad, expired or revoked one"),
        (403, "The token's principal may not do this"),
        (404, "No such object in your tenant"),
        (409, "Conflicts with an earlier request"),
        (413, "The body is over the limit"),
        (422, "Names the field and the rule"),
        (503, "A service the control needs is unavailable"),
    )
}

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem_response(
    status: int, code: str, detail: str, *, field: str | None = None, headers: Any = None
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://toolplane.dev/problems/{code}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _classify(error: ToolplaneError) -> tuple[int, str]:
    if isinstance(error, NotFound):
        return 404, "not_found"
    if isinstance(error, Forbidden):
        return 403, "forbidden"
    if isinstance(error, AuthError):
        return 401, "unauthorized"
    if isinstance(error, Conflict):
        return 409, "idempotency_conflict"
    if isinstance(error, ManifestRefused):
        return 409, "manifest_refused"
    if isinstance(error, ApprovalRefused):
        return 409, "approval_refused"
    if isinstance(error, UsageError):
        return 422, "invalid_argument"
    if isinstance(error, ArtifactInvalid):
        return 409, "artifact_invalid"
    if isinstance(error, Denied):
        return 403, "policy_denied"
    if isinstance(error, (ServiceUnavailable, StoreUnavailable)):
        return 503, "unavailable"
    if isinstance(error, ControlError):
        return 422, "invalid_argument"
    return 422, "invalid_argument"


def _field_and_detail(error: Exception) -> tuple[str | None, str]:
    """The field under its API name, and a detail that names it too (``field: rule``)."""
    field = getattr(error, "field", None)
    if not field:
        return None, str(error)
    name = api_field(str(field))
    return name, f"{name}: {getattr(error, 'rule', str(error))}"


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "body"


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ToolplaneError)
    async def toolplane_error(request: Request, error: ToolplaneError) -> JSONResponse:
        status, code = _classify(error)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        field, detail = _field_and_detail(error)
        if isinstance(error, ServiceUnavailable):  # its text names hosts, ports, settings
            log.warning("api.unavailable path=%r %s", request.url.path, detail)
            field, detail = None, f"{error.service} unavailable; try again"
        elif isinstance(error, StoreUnavailable):  # names buckets and endpoints: logged
            log.warning("api.unavailable path=%r %s", request.url.path, error)
            field, detail = None, f"the store of {error.setting} is unavailable; try again"
        return problem_response(status, code, detail, field=field, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": ("body",), "msg": "invalid"}
        where = _location(tuple(first.get("loc", ("body",))))
        return problem_response(
            422, "invalid_argument", f"{where}: {first.get('msg', 'invalid')}", field=where
        )

    @app.exception_handler(ValidationError)
    async def invalid_value(request: Request, error: ValidationError) -> JSONResponse:
        where, rule = first_problem(error)
        return problem_response(422, "invalid_argument", f"{where}: {rule}", field=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            error.status_code, "invalid_argument"
        )
        return problem_response(error.status_code, code, str(error.detail), headers=error.headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def database_down(request: Request, error: Exception) -> JSONResponse:
        log.warning("api.database_unavailable %s", str(error).splitlines()[0])
        return problem_response(503, "unavailable", "database unavailable; try again")

    @app.exception_handler(DataError)
    async def value_refused(request: Request, error: DataError) -> JSONResponse:
        # A value from the request that PostgreSQL cannot take: a NUL character in an id
        # or a filter, a number out of range. The caller's input, not the server's fault.
        log.info("api.value_refused path=%r %s", request.url.path, str(error.orig).strip())
        return problem_response(
            422,
            "invalid_argument",
            "a value in the request cannot be stored or compared (a NUL character, or a "
            "number out of range)",
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("api.internal_error path=%r", request.url.path)
        return problem_response(500, "internal", "internal error (logged by the server)")


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413, before any route reads it."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413, "too_large", f"the request body is over {self.limit} bytes", field="body"
        )
        await response(scope, receive, send)
