"""The sandbox plane: tool registry and plugins, envelope verification, claims,
the contained executor, receipts, the worker, and the built-in tools.

It never imports ``control``, ``ledger`` or SQLAlchemy, and holds no database
credentials."""

from sandbox_tasks.errors import EnvelopeRefused, RegistryError, SandboxError, ToolFailure
from sandbox_tasks.registry import Limits, ToolContext, ToolSpec, load_tools

__all__ = [
    "EnvelopeRefused",
    "Limits",
    "RegistryError",
    "SandboxError",
    "ToolContext",
    "ToolFailure",
    "ToolSpec",
    "load_tools",
]
