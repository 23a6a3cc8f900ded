"""What a receipt says about the containment a call ran under: built here, once.

The base names how the runner was started: ``bwrap`` (namespaces: no network, own PIDs,
a read-only view of only what the tool needs) or ``runner`` (a fresh, non-dumpable
process of its own, where the host cannot make namespaces: the name then ends with
``(no namespaces)``). The kernel layers applied in each call's own process follow it
(``sandbox_tasks.confine``), and the rlimits every call gets:
``bwrap+landlock7+seccomp+nnp+rlimits``, ``runner+landlock7+seccomp+nnp+rlimits (no
namespaces)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from sandbox_tasks.confine import containment as join_layers

NAMESPACES = "bwrap"
NO_NAMESPACES = "runner"

__all__ = ["NAMESPACES", "NO_NAMESPACES", "describe"]


def describe(base: str, layers: Sequence[str] = ()) -> str:
    """``base``, then each layer in force: what every receipt of the worker records."""
    name = join_layers(base, (*layers, "rlimits"))
    return name if base == NAMESPACES else f"{name} (no namespaces)"
