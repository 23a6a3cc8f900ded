"""What a receipt says about the containment a call ran under: built here, once.

The base names how the runner was started: ``bwrap`` (namespaces: no network, own PIDs,
a read-only view of only what the tool needs) or ``runner (no namespaces)`` (a fresh,
non-dumpable process of its own, where the host cannot make namespaces). Further layers
in force (e.g. Landlock, seccomp) follow it, in the order given: ``bwrap + landlock``.
"""

from __future__ import annotations

from collections.abc import Sequence

NAMESPACES = "bwrap"
NO_NAMESPACES = "runner (no namespaces)"

__all__ = ["NAMESPACES", "NO_NAMESPACES", "describe"]


def describe(base: str, layers: Sequence[str] = ()) -> str:
    """``base``, then each layer in force: what every receipt of the worker records."""
    return " + ".join([base, *layers])
