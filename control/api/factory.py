"""The API application as each of several API processes builds it (``toolplane api`` with
TOOLPLANE_API_PROCESSES > 1: uvicorn's supervisor imports this in every process)."""

from __future__ import annotations

from fastapi import FastAPI

from control.api.app import build_app
from control.ops.runtime import ControlPlane
from toolplane.settings import Settings

__all__ = ["create_app"]


def create_app() -> FastAPI:
    """The control's API from this host's settings (the environment the supervisor got)."""
    return build_app(ControlPlane.from_settings(Settings()))
