"""The API application as each of several API processes builds it (``toolplane api`` with
TOOLPLANE_API_PROCESSES > 1: uvicorn's supervisor imports this in every process)."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

from fastapi import FastAPI

from control.api.app import build_app
from control.ops.metrics import install as install_metrics
from control.ops.runtime import ControlPlane
from toolplane import logfields
from toolplane.settings import Settings

__all__ = ["create_app"]

PR_SET_PDEATHSIG = 1


def _die_with_supervisor() -> None:
    """Stop when the supervisor that started this process dies, however it dies (SIGKILL
    included): else this process would serve the port on, unsupervised, outliving
    `toolplane down` and keeping the next API from binding it."""
    supervisor = multiprocessing.parent_process()  # None unless started by one
    if supervisor is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != supervisor.pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def create_app() -> FastAPI:
    """The control's API from this host's settings (the environment the supervisor got)."""
    _die_with_supervisor()
    settings = Settings()
    if settings.log_format == "json" and not logging.getLogger().handlers:  # a spawned child
        logfields.setup(logging.INFO, "json")
    plane = ControlPlane.from_settings(settings)
    install_metrics(plane.settings.home, plane.engine, on=plane.settings.metrics == "on")
    return build_app(plane)
