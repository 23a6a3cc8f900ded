"""Policy bundles (Cedar), their versions, and decisions with reasons."""

from policy.bundle import PolicyBundle, load_bundle
from policy.engine import Decision, PolicyEngine, PolicyRequest
from policy.errors import BundleError, PolicyError

__all__ = [
    "BundleError",
    "Decision",
    "PolicyBundle",
    "PolicyEngine",
    "PolicyError",
    "PolicyRequest",
    "load_bundle",
]
