"""The environment and data classification a call runs under: the server decides them.

The environment comes from the token (an admin binds it when issuing) or else the
deployment (``TOOLPLANE_ENVIRONMENT``); the classification's floor comes from the
deployment (``TOOLPLANE_CLASSIFICATION``). Each has an order, least strict first
(``TOOLPLANE_ENVIRONMENTS``, ``TOOLPLANE_CLASSIFICATIONS``). A caller may ask for a
stricter one (narrowing what may happen), never a laxer one: what it asks below
the server's is raised to the server's.
"""

from __future__ import annotations

from dataclasses import dataclass

from control.errors import UsageError

__all__ = ["Scope", "decide_scope", "stricter"]


@dataclass(frozen=True)
class Scope:
    environment: str
    classification: str


def stricter(order: tuple[str, ...], server: str, asked: str | None, *, field: str) -> str:
    """``asked`` if it is at least as strict as ``server`` in ``order``, else ``server``."""
    if server not in order:
        raise UsageError(
            f"the server's value {server!r} is not one of {', '.join(order)}", field=field
        )
    if asked is None:
        return server
    if asked not in order:
        raise UsageError(f"must be one of {', '.join(order)}", field=field)
    return asked if order.index(asked) > order.index(server) else server


def decide_scope(
    *,
    environments: tuple[str, ...],
    classifications: tuple[str, ...],
    server_environment: str,
    server_classification: str,
    environment: str | None,
    classification: str | None,
) -> Scope:
    return Scope(
        environment=stricter(environments, server_environment, environment, field="environment"),
        classification=stricter(
            classifications, server_classification, classification, field="classification"
        ),
    )
