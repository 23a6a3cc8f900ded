"""Liveness and readiness, for supervisors and load balancers (no token needed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from control.api.deps import Plane
from control.api.problems import problem_response

router = APIRouter(tags=["health"])

__all__ = ["router"]


@router.get("/livez")
def livez() -> dict[str, str]:
    """The process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready (problem details)"}})
def readyz(control: Plane) -> Any:
    """Ready when the database answers, the broker accepts a connection and a policy
    bundle is loaded."""
    checks: dict[str, str] = {}
    try:
        control.check_database()
        checks["database"] = "ok"
    except Exception as e:  # a readiness probe reports, never raises
        return problem_response(503, "unavailable", f"database: {e}")
    try:
        with control.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as e:
        return problem_response(503, "unavailable", f"broker: {str(e).splitlines()[0]}")
    try:
        checks["policy"] = control.policy.version
    except Exception as e:
        return problem_response(503, "unavailable", f"policy: {e}")
    return JSONResponse({"status": "ready", **checks})
