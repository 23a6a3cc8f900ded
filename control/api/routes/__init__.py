"""The API's routes, one module per resource."""

from control.api.routes import catalog, governance, health, runs

__all__ = ["catalog", "governance", "health", "runs"]
