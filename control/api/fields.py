"""One input, two names: the API's field (``args.path``) and the CLI's option (``--arg path``).

The control's own errors name the CLI's option; the API names its JSON field; the CLI
shows a problem from the API under its option again.
"""

from __future__ import annotations

__all__ = ["api_field", "cli_field"]

_TO_API = {
    "--arg": "args",
    "--input": "inputs",
    "--env": "environment",
    "--classification": "classification",
    "--on-behalf-of": "on_behalf_of",
    "--idempotency-key": "idempotency_key",
    "--expires-in": "expires_in_s",
    "--environment": "environment",
    "--principal": "principal",
    "--role": "role",
    "--reason": "reason",
    "RUN": "run_id",
    "NODE": "node_id",
    "TOOL": "tool",
    "WORKFLOW": "workflow",
}
_TO_CLI = {v: k for k, v in _TO_API.items() if k != "--environment"}
_TO_CLI["environment"] = "--env"


def api_field(field: str) -> str:
    """``--arg path`` -> ``args.path``; ``--env`` -> ``environment``."""
    head, _, rest = field.partition(" ")
    name = _TO_API.get(head, head.lstrip("-").replace("-", "_"))
    return f"{name}.{rest}" if rest else name


def cli_field(field: str) -> str:
    """``args.path`` -> ``--arg path``; ``environment`` -> ``--env``."""
    head, _, rest = field.partition(".")
    if head in ("args", "inputs") and rest:
        return f"{_TO_CLI[head]} {rest}"
    return _TO_CLI.get(field, field)
