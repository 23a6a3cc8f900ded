"""Errors of the control plane, each with the exit code the CLI uses for it.

ControlError (1)
├── UsageError (2)          bad input: names the field and the rule
├── UsageError (2)
│   ├── Conflict (2)        a key already used for another request (HTTP 409)
│   └── ManifestRefused (2) a tool manifest that cannot be approved (HTTP 409)
├── AuthError (1)           missing, unknown, expired or revoked token (HTTP 401)
│   └── Forbidden (1)       the principal's role or relation to the object may not (HTTP 403)
├── NotFound (1)            no such run/node in *your* tenant (never "forbidden")
├── ArtifactInvalid (1)     a result's artifact is missing or not its hash's (HTTP 409)
├── Denied (3)              policy or entitlement said no
└── ServiceUnavailable (1)  broker or database cannot be reached
"""

from __future__ import annotations

from toolplane.errors import ToolplaneError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DENIED = 3
EXIT_TOOL_FAILED = 4
EXIT_AWAITING_APPROVAL = 5


class ControlError(ToolplaneError):
    exit_code = EXIT_ERROR


class UsageError(ControlError):
    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.rule = message


class Conflict(UsageError):
    """The request conflicts with one made before (an idempotency key reused)."""


class ManifestRefused(UsageError):
    """A tool's manifest that cannot be approved (its schema, its shape, or ambiguous)."""


class AuthError(ControlError):
    """The token is missing, unknown, expired or revoked."""


class Forbidden(AuthError):
    """The token is good, but its principal may not do this (role, submitter, operator)."""


class NotFound(ControlError):
    def __init__(self, what: str, ident: str, *, message: str | None = None) -> None:
        super().__init__(message or f"{what} {ident!r} not found")
        self.what = what
        self.ident = ident

    @classmethod
    def from_detail(cls, detail: str) -> NotFound:
        """As the API said it (the client's side of a 404)."""
        return cls("", "", message=detail)


class ArtifactInvalid(ControlError):
    """A result kept in the artifact store is missing from it, or its bytes are not its
    hash's: named by hash, run and node, never served."""

    def __init__(self, message: str, *, sha256: str | None = None) -> None:
        super().__init__(message)
        self.sha256 = sha256


class Denied(ControlError):
    exit_code = EXIT_DENIED


class ServiceUnavailable(ControlError):
    def __init__(self, service: str, message: str) -> None:
        super().__init__(f"{service} unavailable: {message}")
        self.service = service


def require_text(value: str, *, field: str, max_chars: int = 1000) -> str:
    """A reason or label from a person: 1..max_chars printable characters (no escapes)."""
    if not value.strip() or len(value) > max_chars or not value.isprintable():
        raise UsageError(
            f"must be 1-{max_chars} printable characters (no control characters)", field=field
        )
    return value
