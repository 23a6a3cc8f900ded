"""Who is looking at the console, and what protects each request.

- The session cookie (``tp_console``) is HttpOnly, SameSite=Strict, path ``/console``,
  and Secure whenever the request came over TLS. It names a server-side session
  (:mod:`control.api.console.sessions`) whose token is authenticated on every request
  exactly as the API authenticates a bearer token: revoked or expired, the session ends.
- Every form carries a CSRF token: the session's secret (signed-in forms) or, for the
  sign-in form, a random value also set in its own cookie (double submit). A POST
  without the right one, or from another origin, is refused with 403 and changes nothing.
- Every console response carries a Content-Security-Policy that allows no inline script
  or style and nothing from another origin, and forbids framing.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from fastapi import Depends, Request
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control.api.console.sessions import ConsoleSession, SessionStore
from control.errors import AuthError
from control.governance.auth import authenticate
from control.orchestration.operations import Operations

__all__ = [
    "COOKIE",
    "CSP",
    "PATH",
    "PRE_COOKIE",
    "ConsoleHeaders",
    "CsrfRefused",
    "SignInRequired",
    "Viewer",
    "ViewerOf",
    "form_of",
    "new_pre_token",
    "set_cookie",
    "store_of",
    "viewer",
]

COOKIE = "tp_console"
PRE_COOKIE = "tp_console_signin"  # the sign-in form's double-submit CSRF value
PATH = "/console"
MAX_FIELDS = 20
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class SignInRequired(Exception):  # noqa: N818 - a flow signal, handled as a redirect
    """No session, or its token no longer authenticates: back to the sign-in page."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class CsrfRefused(Exception):  # noqa: N818 - handled as a 403 page
    """A form post without the right CSRF token (or from another origin)."""


@dataclass(frozen=True)
class Viewer:
    """A signed-in person: their session and the operations their token allows."""

    ops: Operations
    session_id: str
    session: ConsoleSession

    @property
    def csrf(self) -> str:
        return self.session.csrf


def store_of(request: Request) -> SessionStore:
    return request.app.state.console_sessions  # type: ignore[no-any-return]


def viewer(request: Request) -> Viewer:
    """The signed-in viewer; SignInRequired without a session or a good token."""
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        raise SignInRequired()
    store = store_of(request)
    session = store.get(session_id)
    if session is None:
        raise SignInRequired("your session has ended; sign in again")
    plane = request.app.state.plane
    try:
        with plane.sessions() as db:
            identity = authenticate(db, session.token)
    except AuthError as e:  # revoked or expired: the session goes with the token
        store.delete(session_id)
        raise SignInRequired(f"your session has ended: {e}") from e
    seen = Viewer(Operations(plane, identity=identity), session_id, session)
    request.state.viewer = seen  # for the error pages of this request
    return seen


ViewerOf = Annotated[Viewer, Depends(viewer)]


def _same_origin(request: Request) -> bool:
    """A form post from this origin (browsers send Origin on POST): another is refused."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None  # no Origin (an old client): the CSRF token still decides
    parts = urlsplit(origin)
    return parts.scheme == request.url.scheme and parts.netloc == request.url.netloc


async def form_of(request: Request, expected: str | None) -> dict[str, str]:
    """The posted form's fields (urlencoded), once its CSRF token matched ``expected``."""
    body = (await request.body()).decode("utf-8", errors="replace")
    try:
        fields = parse_qs(body, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError as e:
        raise CsrfRefused("the form has too many fields") from e
    form = {k: v[0] for k, v in fields.items()}
    given = form.get("csrf", "")
    if not expected or not given or not hmac.compare_digest(given, expected):
        raise CsrfRefused("the form's CSRF token is missing or wrong")
    if not _same_origin(request):
        raise CsrfRefused("the form was posted from another origin")
    return form


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def new_pre_token() -> str:
    return secrets.token_urlsafe(32)


class ConsoleHeaders:
    """The console's security headers on every response under /console (plain ASGI, so
    that event streams pass through unbuffered)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PATH or path.startswith(PATH + "/")):
            await self.app(scope, receive, send)
            return
        static = path.startswith(PATH + "/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "same-origin"  # no-referrer would make Origin "null"
                if not static and "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)
