"""Liveness and readiness, for supervisors and load balancers (no token needed)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from control.api.deps import Plane
from control.api.problems import problem_response

router = APIRouter(tags=["health"])
log = logging.getLogger("toolplane.api")

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
        return _not_ready("database", e)
    try:
        with control.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as e:
        return _not_ready("broker", e)
    try:
        checks["policy"] = control.policy.version
    except Exception as e:
        return _not_ready("policy", e)
    return JSONResponse({"status": "ready", **checks})


def _not_ready(service: str, error: Exception) -> Any:
    """503 naming the service; why (addresses, users, paths) goes to the log, not to
    whoever asked: /readyz needs no token."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    log.warning("api.not_ready service=%s error=%s", service, first)
    return problem_response(503, "unavailable", f"{service} unavailable (see the control's log)")
