"""The API's dependencies: the control plane of this process, and who is calling."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from control.governance.auth import authenticate
from control.ops.runtime import ControlPlane
from control.orchestration.operations import Operations

__all__ = ["Caller", "Plane", "bearer", "caller"]

bearer = HTTPBearer(
    auto_error=False,
    description="An API token (`toolplane tenant create`, `toolplane token issue`).",
)


def plane(request: Request) -> ControlPlane:
    return request.app.state.plane  # type: ignore[no-any-return]


Plane = Annotated[ControlPlane, Depends(plane)]


def caller(
    control: Plane,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Operations:
    """The operations of the principal the bearer token names (401 without a good one)."""
    token = credentials.credentials if credentials is not None else None
    with control.sessions() as session:
        identity = authenticate(session, token)
    return Operations(control, identity=identity)


Caller = Annotated[Operations, Depends(caller)]
