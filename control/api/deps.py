"""The API's dependencies: the control plane of this process, and who is calling."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from control.governance.auth import authenticate
from control.ops.runtime import ControlPlane
from control.orchestration.operations import Operations

__all__ = ["Caller", "Plane", "bearer", "caller", "read_sessions"]

bearer = HTTPBearer(
    auto_error=False,
    description="An API token (`toolplane tenant create`, `toolplane token issue`).",
)


def read_sessions(control: ControlPlane) -> sessionmaker[Session]:
    """Sessions for requests that only read (authentication, run views, event streams):
    in autocommit, each statement is its own transaction, so a read costs one round trip
    instead of three (BEGIN, the statement, ROLLBACK). Each statement of a READ COMMITTED
    transaction sees its own snapshot anyway, so a read sees what it saw before."""
    return sessionmaker(
        control.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
    )


def plane(request: Request) -> ControlPlane:
    return request.app.state.plane  # type: ignore[no-any-return]


Plane = Annotated[ControlPlane, Depends(plane)]


def caller(
    request: Request,
    control: Plane,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Operations:
    """The operations of the principal the bearer token names (401 without a good one):
    the token is read from the database on every request, so a revoked one fails at once."""
    token = credentials.credentials if credentials is not None else None
    reads: sessionmaker[Session] = request.app.state.reads
    with reads() as session:
        identity = authenticate(session, token)
    return Operations(control, identity=identity, reads=reads)


Caller = Annotated[Operations, Depends(caller)]
