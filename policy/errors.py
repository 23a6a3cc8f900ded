"""Errors of the policy package."""

from __future__ import annotations

from pathlib import Path

from toolplane.errors import ToolplaneError


class PolicyError(ToolplaneError):
    """Root of the policy package's errors."""


class BundleError(PolicyError):
    """A policy bundle that cannot be loaded; the running bundle stays in force."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
