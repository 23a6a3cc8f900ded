"""The review console: approvals, runs and evidence in a browser, served by the API.

Server-rendered pages (Jinja2, autoescaped) with one small script for what must be
live; every page acts through the same functions, tokens, roles and tenant scoping as
the API routes (docs/console.md).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from control.api.console import access, catalog, runs
from control.api.console.guard import PATH, ConsoleHeaders
from control.api.console.sessions import MemorySessionStore, RedisSessionStore, SessionStore
from control.ops.runtime import ControlPlane

__all__ = ["install_console"]


def install_console(app: FastAPI, plane: ControlPlane) -> None:
    """Mount the console at /console: its session store, pages, static files, headers."""
    url = plane.redis_url
    store: SessionStore = (
        RedisSessionStore.from_url(url) if url is not None else MemorySessionStore()
    )
    app.state.console_sessions = store
    for module in (access, runs, catalog):
        app.include_router(module.router)
    static = StaticFiles(directory=Path(__file__).parent / "static")
    app.mount(f"{PATH}/static", static, name="console-static")
    app.add_middleware(ConsoleHeaders)
