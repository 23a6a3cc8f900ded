"""Constraints a policy bundle puts on calls that it permits.

``constraints.json`` in a bundle (optional; part of the bundle's version):

    {"rules": [
      {"tool": "lint_python", "environment": "prod", "limits": {"timeout_s": 5}},
      {"tool": "*", "classification": "confidential", "egress": []},
      {"tool": "crm_sync", "private_egress": ["crm.internal:443"]}
    ]}

Every rule whose ``tool`` (or ``*``), ``environment`` and ``classification``
(when given) match applies: limits only ever go down (the smallest value of
each wins, and never above what the tool declares); ``egress`` lists the hosts
a call may reach, intersected over the rules (a tool still reaches only hosts
it declares). ``private_egress`` names the hosts a call may reach although they
resolve to loopback, private, link-local or metadata addresses (which the worker
otherwise refuses), united over the rules; it grants no host the tool or the
``egress`` rules do not. Control signs the result into the envelope; the worker
applies it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policy.errors import BundleError
from toolplane.errors import first_problem

FILE = "constraints.json"
LIMIT_FIELDS = (
    "timeout_s",
    "cpu_s",
    "memory_mb",
    "output_bytes",
    "file_bytes",
    "open_files",
    "processes",
)

__all__ = ["Constraints", "ConstraintSet", "load_constraints"]


class _Limits(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    timeout_s: float | None = Field(default=None, gt=0)
    cpu_s: int | None = Field(default=None, gt=0)
    memory_mb: int | None = Field(default=None, gt=0)
    output_bytes: int | None = Field(default=None, gt=0)
    file_bytes: int | None = Field(default=None, gt=0)
    open_files: int | None = Field(default=None, gt=0)
    processes: int | None = Field(default=None, gt=0)


class _Rule(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    tool: str = Field(min_length=1)
    environment: str | None = None
    classification: str | None = None
    limits: _Limits = _Limits()
    egress: list[str] | None = None
    private_egress: list[str] = Field(default_factory=list, max_length=100)


class _File(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    rules: list[_Rule]


@dataclass(frozen=True)
class Constraints:
    """What applies to one call: lowered limits, and the hosts it may reach (None: any declared)."""

    limits: dict[str, float]
    egress: tuple[str, ...] | None
    private_egress: tuple[str, ...] = ()  # hosts that may resolve to non-public addresses

    def as_dict(self) -> dict[str, Any]:
        return {
            "limits": self.limits,
            "egress": None if self.egress is None else list(self.egress),
            "private_egress": list(self.private_egress),
        }


@dataclass(frozen=True)
class ConstraintSet:
    rules: tuple[_Rule, ...] = ()

    def for_call(self, *, tool: str, environment: str, classification: str) -> Constraints:
        limits: dict[str, float] = {}
        egress: set[str] | None = None
        private: set[str] = set()
        for rule in self.rules:
            if rule.tool not in ("*", tool):
                continue
            if rule.environment not in (None, environment):
                continue
            if rule.classification not in (None, classification):
                continue
            for name, value in rule.limits.model_dump(exclude_none=True).items():
                limits[name] = min(value, limits.get(name, value))
            if rule.egress is not None:
                hosts = set(rule.egress)
                egress = hosts if egress is None else egress & hosts
            private.update(rule.private_egress)
        if egress is not None:
            private &= egress
        return Constraints(
            limits, None if egress is None else tuple(sorted(egress)), tuple(sorted(private))
        )


def load_constraints(bundle: Path) -> ConstraintSet:
    path = bundle / FILE
    if not path.exists():
        return ConstraintSet()
    try:
        parsed = _File.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        message = ": ".join(first_problem(e)) if isinstance(e, ValidationError) else str(e)
        raise BundleError(f"{FILE}: {message}", path=bundle) from e
    return ConstraintSet(tuple(parsed.rules))
