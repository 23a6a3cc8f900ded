"""The control's HTTP API (FastAPI): the only way in for callers.

``build_app(plane)`` is the composition: one control plane per process (database,
broker, keys and policy are the control's, never the caller's), the problem
handlers, the body limit and the run-event hub that the event streams wait on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from control.api.events import RunEventHub
from control.api.problems import BodyLimit, install_problem_handlers
from control.api.routes import catalog, governance, health, runs
from control.runtime import ControlPlane

__all__ = ["API_VERSION", "build_app"]

API_VERSION = "1"


def build_app(plane: ControlPlane) -> FastAPI:
    hub = RunEventHub(plane.database_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        listener = asyncio.create_task(hub.run(), name="run-events")
        try:
            yield
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            plane.engine.dispose()

    app = FastAPI(
        title="toolplane",
        version=API_VERSION,
        summary="A governed execution plane for the tools that AI agents call.",
        description=(
            "Every request but /livez and /readyz needs `Authorization: Bearer TOKEN`. "
            "Errors are RFC 9457 problem details with a stable `code`. A policy or "
            "entitlement denial is not an error: it is a run with status `denied`."
        ),
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.plane = plane
    app.state.events = hub
    install_problem_handlers(app)
    for module in (health, runs, governance, catalog):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, limit=plane.settings.api_max_body)
    return app
