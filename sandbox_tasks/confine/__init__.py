"""Kernel layers for a tool's own process that hold without namespaces.

``Confinement`` says what one call may reach; ``confine`` applies it (rlimits,
no_new_privs, Landlock, seccomp) to the calling process for good; ``available`` says
which layers this host has; ``containment`` names them for a receipt. See
``sandbox_tasks.confine.layers``.
"""

from sandbox_tasks.confine.layers import (
    Confinement,
    ConfinementError,
    available,
    confine,
    containment,
    missing,
    trial,
    worker_layers,
)

__all__ = [
    "Confinement",
    "ConfinementError",
    "available",
    "confine",
    "containment",
    "missing",
    "trial",
    "worker_layers",
]
