"""Shared pure helpers that both planes import: canonical JSON, hashing, signing,
settings, wire messages and the root exception. Nothing here does network or
database I/O except reading key files."""

from toolplane.errors import ToolplaneError

__all__ = ["ToolplaneError"]
