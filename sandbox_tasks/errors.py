"""Errors of the sandbox plane (under toolplane.ToolplaneError)."""

from __future__ import annotations

from toolplane.errors import ToolplaneError

# Error codes of the public contract (docs/orchestration.md lists them).
ERROR_CODES = (
    "invalid_argument",
    "path_outside_root",
    "symlink_refused",
    "not_found",
    "too_large",
    "timeout",
    "policy_denied",
    "entitlement_exceeded",
    "approval_rejected",
    "receipt_invalid",
    "envelope_invalid",
    "envelope_expired",
    "replay",
    "tool_error",
)


class SandboxError(ToolplaneError):
    """Root of the sandbox plane's errors."""


class ToolFailure(SandboxError):
    """A tool refuses its input or fails; ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class EnvelopeRefused(SandboxError):
    """A job envelope that the worker will not run; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RegistryError(SandboxError):
    """A tool plugin that cannot be loaded or is malformed."""

    def __init__(self, message: str, *, tool: str | None = None) -> None:
        super().__init__(message)
        self.tool = tool


class CgroupError(SandboxError, OSError):
    """A sandbox's processes could not all be killed through its cgroup at ``path``."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path
