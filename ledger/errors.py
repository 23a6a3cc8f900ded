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
