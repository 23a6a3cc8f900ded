"""The exception tree of toolplane.

    ToolplaneError                      root: everything toolplane raises on purpose
    ├── CanonicalJSONError              a value that RFC 8785 JSON cannot carry safely
    ├── SignatureError                  a signature that does not verify
    │   └── UnknownKeyError             a key id that is not (or no longer) trusted
    ├── SettingsError                   a setting that is missing or malformed
    ├── control.errors.ControlError     intake, auth, dispatch, ingest, CLI
    ├── ledger.errors.LedgerError       evidence store and verification
    ├── policy.errors.PolicyError       bundle loading and decisions
    └── sandbox_tasks.errors.SandboxError   envelopes, claims, execution

Each exception carries its context as attributes so that a log line or a CLI
message can name the field, the run or the key that was at fault.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


def first_problem(error: ValidationError, *, where: str = "value") -> tuple[str, str]:
    """The field (a dotted path, ``where`` at the top) and the rule of the first problem."""
    first = error.errors()[0]
    return ".".join(str(p) for p in first["loc"]) or where, str(first["msg"])


class ToolplaneError(Exception):
    """Root of every error that toolplane raises on purpose."""


class CanonicalJSONError(ToolplaneError, ValueError):
    """A value cannot be carried as RFC 8785 canonical JSON (NaN, big int, duplicate key)."""

    def __init__(self, message: str, *, path: str = "$") -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class SignatureError(ToolplaneError):
    """A signature is missing, malformed or does not verify."""

    def __init__(self, message: str, *, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id


class UnknownKeyError(SignatureError):
    """The key id is unknown, belongs to another owner, or is outside its validity window."""


class SettingsError(ToolplaneError):
    """A setting is missing or malformed."""

    def __init__(self, message: str, *, setting: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
