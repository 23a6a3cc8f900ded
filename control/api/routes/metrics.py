"""``GET /metrics``: the control's metrics, for an admin of an operator tenant only.

Counts of every tenant's calls are the operator's to see, never a tenant's: a missing or
bad token is 401, any other token (a tenant's admin included) 403, as problem details
that name the rule. With ``TOOLPLANE_METRICS=off``, an operator's admin gets 404 (nothing
is counted), and everyone else the same 401 or 403 as when metrics are on.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials

from control.api.deps import Plane, bearer
from control.errors import AuthError, Forbidden, NotFound
from control.governance.auth import Role, authenticate
from control.ops.metrics_state import CONTENT_TYPE, render

router = APIRouter(tags=["operations"])

__all__ = ["OFF", "RULE", "router"]

RULE = "GET /metrics needs the token of an admin of an operator tenant"
OFF = "the control's metrics are off (TOOLPLANE_METRICS=off): nothing is counted"


@router.get("/metrics", include_in_schema=False)
def metrics(
    request: Request,
    control: Plane,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Response:
    """The control's counters (summed over its processes) and its state gauges, read now."""
    token = credentials.credentials if credentials is not None else None
    try:
        with request.app.state.reads() as session:
            identity = authenticate(session, token)
    except Forbidden:
        raise
    except AuthError as e:
        raise AuthError(f"{e}; {RULE}") from e
    if identity.role is not Role.ADMIN or not identity.operator:
        raise Forbidden(
            f"{RULE}: this token is a {identity.role.value}'s of a tenant that is"
            f"{'' if identity.operator else ' not'} an operator"
        )
    if control.settings.metrics == "off":
        raise NotFound("", "", message=OFF)
    return Response(render(control), media_type=CONTENT_TYPE)
