"""Entitlement plans: how much each tenant may call, as part of a policy bundle.

``entitlements.json`` in a bundle (optional; part of the bundle's version):

    {
      "plans": {
        "standard": {
          "rate": {"calls": 60, "per_s": 60},   # calls in any sliding window
          "daily_calls": 5000,                  # per UTC day
          "daily_tool_seconds": 3600,           # budget of tool time per UTC day
          "run_max_calls": 50,                  # calls in one run
          "queued_per_tool": 100                # jobs waiting per tool
        }
      },
      "tenants": {"acme": "standard"},          # tenant name -> plan
      "default": "standard"                     # every other tenant (omit: unlimited)
    }

Every limit is optional; a missing one does not limit. A tenant without a plan
(no entry and no default) is not limited at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from policy.errors import BundleError
from toolplane.errors import first_problem

FILE = "entitlements.json"

__all__ = ["EntitlementPlans", "Plan", "RateLimit", "load_plans"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class RateLimit(_Strict):
    calls: int = Field(ge=1, le=1_000_000)
    per_s: int = Field(ge=1, le=86_400)


class Plan(_Strict):
    rate: RateLimit | None = None
    daily_calls: int | None = Field(default=None, ge=0, le=100_000_000)
    daily_tool_seconds: int | None = Field(default=None, ge=0, le=100_000_000)
    run_max_calls: int | None = Field(default=None, ge=1, le=100_000)
    queued_per_tool: int | None = Field(default=None, ge=1, le=1_000_000)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class _File(_Strict):
    plans: dict[str, Plan]
    tenants: dict[str, str] = Field(default_factory=dict)
    default: str | None = None

    @model_validator(mode="after")
    def _known_plans(self) -> _File:
        for tenant, plan in self.tenants.items():
            if plan not in self.plans:
                raise ValueError(f"tenants.{tenant}: no plan named {plan!r}")
        if self.default is not None and self.default not in self.plans:
            raise ValueError(f"default: no plan named {self.default!r}")
        return self


@dataclass(frozen=True)
class EntitlementPlans:
    plans: dict[str, Plan] = field(default_factory=dict)
    tenants: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    def for_tenant(self, tenant_name: str) -> tuple[str, Plan] | None:
        """The tenant's plan name and plan, or None when it is not limited."""
        name = self.tenants.get(tenant_name, self.default)
        return None if name is None else (name, self.plans[name])


def load_plans(bundle: Path) -> EntitlementPlans:
    path = bundle / FILE
    if not path.exists():
        return EntitlementPlans()
    try:
        parsed = _File.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        message = ": ".join(first_problem(e)) if isinstance(e, ValidationError) else str(e)
        raise BundleError(f"{FILE}: {message}", path=bundle) from e
    return EntitlementPlans(dict(parsed.plans), dict(parsed.tenants), parsed.default)
