"""Rendering the console's pages, and what any page does when a request goes wrong.

Templates are Jinja2 with autoescaping on for every one of them: tool arguments,
results, reasons and names are untrusted text and are only ever rendered as text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy.exc import DataError
from starlette.responses import HTMLResponse, RedirectResponse, Response

from control.api.console.guard import COOKIE, PATH, CsrfRefused, SignInRequired, Viewer
from control.errors import (
    AuthError,
    ControlError,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    UsageError,
)

__all__ = ["ConsoleRoute", "render"]

log = logging.getLogger("toolplane.api.console")

TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,  # every template, whatever its name
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(
    request: Request,
    name: str,
    *,
    viewer: Viewer | None = None,
    code: int = 200,
    **context: Any,
) -> HTMLResponse:
    viewer = viewer or getattr(request.state, "viewer", None)
    page = TEMPLATES.get_template(name).render(
        viewer=viewer,
        identity=viewer.ops.identity if viewer else None,
        csrf=viewer.csrf if viewer else "",
        base=PATH,
        **context,
    )
    return HTMLResponse(page, status_code=code)


def _problem(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
    return render(request, "problem.html", code=status, title=title, detail=detail)


def not_found(request: Request) -> HTMLResponse:
    """The one not-found page: an unknown id and another tenant's look the same."""
    return _problem(request, 404, "Not found", "There is nothing here for your tenant.")


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class ConsoleRoute(APIRoute):
    """A console route: errors become pages (or the sign-in page), never problem JSON."""

    def get_route_handler(self) -> Handler:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except SignInRequired as e:
                return _to_sign_in(ended=bool(e.reason))
            except CsrfRefused as e:
                return _problem(request, 403, "Refused", str(e))
            except NotFound:
                return not_found(request)
            except Forbidden as e:
                return _problem(request, 403, "Not allowed", str(e))
            except AuthError:
                return _to_sign_in(ended=True)
            except UsageError as e:
                return _problem(request, 422, "Not accepted", str(e))
            except RequestValidationError as e:  # a query value or header of the wrong form
                return _problem(request, 422, "Not accepted", _first(e))
            except DataError:  # a NUL character in an id: PostgreSQL cannot compare it
                return _problem(
                    request,
                    422,
                    "Not accepted",
                    "a value in the request cannot be stored or compared (a NUL character, "
                    "or a number out of range)",
                )
            except ServiceUnavailable as e:  # its text names hosts and ports: logged only
                log.warning("console.unavailable path=%r %s", request.url.path, e)
                return _problem(request, 503, "Unavailable", f"{e.service} unavailable; try again")
            except ControlError as e:
                return _problem(request, 409, "Could not be done", str(e))

        return handler


def _first(error: RequestValidationError) -> str:
    """The first problem of a request's parameters, as "field: rule"."""
    found = error.errors()
    if not found:
        return "the request is not valid"
    where = [str(p) for p in found[0].get("loc", ()) if p not in ("query", "header", "path")]
    return f"{'.'.join(where) or 'request'}: {found[0].get('msg', 'invalid')}"


def _to_sign_in(*, ended: bool) -> Response:
    response = RedirectResponse(f"{PATH}/sign-in" + ("?ended=1" if ended else ""), 303)
    response.delete_cookie(COOKIE, path=PATH)
    return response
