"""Policy tests: requests with the decisions a bundle must give them.

A bundle keeps its tests in ``tests/*.json``, each file ``{"cases": [...]}``:

    {"name": "prod reads of README need an approval",
     "request": {"tool": "read_repo_file", "environment": "prod",
                 "classification": "internal", "args": {"path": "README.md"}},
     "expect": "approval_required",
     "policies": ["prod-repo-reads-outside-src-need-approval"],
     "log_only": "deny"}

``expect`` is ``allow``, ``deny`` or ``approval_required``; ``policies`` (the
deciding @ids, in any order) and ``log_only`` (what log-only policies would
have decided) are checked when given. ``request`` defaults: tenant ``test``,
principal ``tester``, role ``submitter``, environment ``dev``, classification
``internal``, workflow ``call``, no args.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policy.bundle import PolicyBundle
from policy.engine import PolicyEngine, PolicyRequest
from policy.errors import BundleError
from toolplane.canonical import CanonicalJSONError, parse_json_strict
from toolplane.errors import first_problem

TESTS_DIR = "tests"
Outcome = Literal["allow", "deny", "approval_required"]

__all__ = ["CaseResult", "TestReport", "load_cases", "run_policy_tests"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _Request(_Strict):
    tool: str = Field(min_length=1)
    tenant: str = "test"
    principal: str = "tester"
    role: str = "submitter"
    environment: str = "dev"
    classification: str = "internal"
    workflow: str = "call"
    args: dict[str, Any] = Field(default_factory=dict)
    on_behalf_of: str | None = None


class Case(_Strict):
    name: str = Field(min_length=1)
    request: _Request
    expect: Outcome
    policies: list[str] | None = None
    log_only: Outcome | None = None


class _File(_Strict):
    cases: list[Case]


@dataclass(frozen=True)
class CaseResult:
    file: str
    case: Case
    outcome: str
    policies: tuple[str, ...]
    reason: str
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "name": self.case.name,
            "passed": self.passed,
            "expect": self.case.expect,
            "outcome": self.outcome,
            "policies": list(self.policies),
            "reason": self.reason,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class TestReport:
    bundle_version: str
    results: tuple[CaseResult, ...]

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failed(self) -> int:
        return sum(not r.passed for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "bundle_version": self.bundle_version,
            "cases": len(self.results),
            "failed": self.failed,
            "results": [r.as_dict() for r in self.results],
        }


def load_cases(bundle_dir: Path) -> list[tuple[str, Case]]:
    """Every case of the bundle's tests, with its file's name; BundleError naming the field."""
    folder = bundle_dir / TESTS_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise BundleError(f"no policy tests: add {TESTS_DIR}/*.json", path=bundle_dir)
    cases: list[tuple[str, Case]] = []
    for file in files:
        name = file.relative_to(bundle_dir).as_posix()
        try:
            parsed = _File.model_validate(parse_json_strict(file.read_text(encoding="utf-8")))
        except ValidationError as e:
            field, rule = first_problem(e)
            raise BundleError(f"{name}: {field}: {rule}", path=bundle_dir) from e
        except (OSError, UnicodeDecodeError, CanonicalJSONError, json.JSONDecodeError) as e:
            raise BundleError(f"{name}: {e}", path=bundle_dir) from e
        cases.extend((name, case) for case in parsed.cases)
    return cases


def run_policy_tests(bundle: PolicyBundle) -> TestReport:
    engine = PolicyEngine(bundle)
    results = []
    for file, case in load_cases(bundle.path):
        r = case.request
        decision = engine.decide(
            PolicyRequest(
                tenant=r.tenant,
                principal=r.principal,
                role=r.role,
                tool=r.tool,
                environment=r.environment,
                classification=r.classification,
                workflow=r.workflow,
                args=r.args,
                on_behalf_of=r.on_behalf_of,
            )
        )
        problems = []
        if decision.outcome != case.expect:
            problems.append(f"expected {case.expect}, got {decision.outcome}: {decision.reason}")
        if case.policies is not None and sorted(case.policies) != sorted(decision.policies):
            problems.append(
                f"expected policies {sorted(case.policies)}, got {sorted(decision.policies)}"
            )
        if case.log_only is not None:
            would = decision.log_only["decision"] if decision.log_only else decision.outcome
            if would != case.log_only:
                problems.append(f"expected log-only decision {case.log_only}, got {would}")
        results.append(
            CaseResult(
                file, case, decision.outcome, decision.policies, decision.reason, tuple(problems)
            )
        )
    return TestReport(bundle.version, tuple(results))
