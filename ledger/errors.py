"""Errors of the ledger package."""

from __future__ import annotations

from toolplane.errors import ToolplaneError


class LedgerError(ToolplaneError):
    """Root of the ledger's errors."""


class DatabaseUnavailable(LedgerError):
    """The database cannot be reached or refused the connection."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(f"{message} ({url})")
        self.url = url


class StoreUnavailable(LedgerError):
    """A checkpoint or artifact store outside the database cannot be used: its bucket is
    missing, access is denied, or its endpoint is down. ``setting`` names the setting
    that selects it (``TOOLPLANE_CHECKPOINT_STORE``, ``TOOLPLANE_ARTIFACT_STORE``)."""

    def __init__(self, message: str, *, setting: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
