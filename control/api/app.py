"""The control's HTTP API (FastAPI): the only way in for callers.

``build_app(plane)`` is the composition: one control plane per process (database,
broker, keys and policy are the control's, never the caller's), the problem
handlers, the body limit and the run-event hub that the event streams wait on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI

from control.api.console import install_console
from control.api.deps import read_sessions
from control.api.events import RunEventHub
from control.api.models import Problem
from control.api.problems import PROBLEMS, BodyLimit, install_problem_handlers
from control.api.routes import catalog, governance, health, ledger, metrics, runs
from control.ops.runtime import ControlPlane
from control.ops.tracing import start_control_tracing

__all__ = ["API_VERSION", "build_app"]

API_VERSION = "1"


def build_app(plane: ControlPlane) -> FastAPI:
    start_control_tracing()  # once per process: on if an OTLP endpoint is configured
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
        docs_url=None,  # Swagger UI would load scripts from a CDN: /openapi.json is the contract
        redoc_url=None,
    )
    app.state.plane = plane
    app.state.reads = read_sessions(plane)
    app.state.events = hub
    app.state.verifying = threading.BoundedSemaphore(1)  # ledger verifications at once
    install_problem_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    for module in (runs, governance, catalog, ledger):
        app.include_router(module.router, responses=PROBLEMS)
    install_console(app, plane)
    _problem_schema(app)
    app.add_middleware(BodyLimit, limit=plane.settings.api_max_body)
    return app


def _problem_schema(app: FastAPI) -> None:
    """Put the Problem schema into the OpenAPI document (the error responses refer to it)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, object]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas["Problem"] = Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
