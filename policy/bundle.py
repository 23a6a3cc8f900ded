"""Policy bundles: a directory of Cedar policies, a Cedar schema, entitlement
plans and policy tests.

A bundle's version is the SHA-256 of its contents (file names and bytes), so the
same files always make the same version and any change makes a new one. A bundle
is validated against its schema at load; one that fails is refused.

Annotations on a policy (besides the required ``@id``):

- ``@mode("log_only")``: the policy is observed, not enforced. Decisions record
  what it would have changed; the enforced decision ignores it.
- ``@approval("1h")`` on a ``forbid``: "forbidden unless a human approves".
  When such policies are the only ones that forbid a call that the rest of the
  bundle permits, the call waits for an approval that expires after the given
  time (``30m``, ``2h``, ``1d``, ``3600s``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy

from policy.constraints import ConstraintSet, load_constraints
from policy.entitlements import EntitlementPlans, load_plans
from policy.errors import BundleError
from policy.labels import DataLabels, load_labels
from toolplane.canonical import digest, sha256_hex

POLICY_SUFFIX = ".cedar"
SCHEMA_FILE = "schema.cedarschema"
MODES = ("enforce", "log_only")
DURATION = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_APPROVAL_S = 30 * 86400

__all__ = ["PolicyBundle", "PolicyInfo", "PolicySubset", "load_bundle", "parse_duration"]


def parse_duration(text: str) -> int:
    """``30s``, ``15m``, ``2h``, ``7d`` -> seconds; ValueError naming the rule otherwise."""
    match = DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30m, 2h or 7d")
    return int(match.group(1)) * UNIT_S[match.group(2)]


@dataclass(frozen=True)
class PolicyInfo:
    id: str
    effect: str  # permit or forbid
    mode: str  # enforce or log_only
    approval_s: int | None  # set on forbid policies that an approval lifts


@dataclass(frozen=True)
class PolicySubset:
    """Some of the bundle's policies, parsed once, with Cedar's ids mapped to our @ids."""

    policy_set: cedarpy.PolicySet
    names: dict[str, str]


@dataclass(frozen=True)
class PolicyBundle:
    path: Path
    version: str
    policies_text: str
    schema_text: str
    policies: dict[str, PolicyInfo]  # @id -> what the annotations say
    files: dict[str, str]  # relative name -> sha256 of its bytes
    enforced: PolicySubset  # every policy not in log-only mode
    log_only: PolicySubset  # only the log-only policies
    unapproved: PolicySubset  # enforced, without the approval forbids
    schema: cedarpy.Schema
    constraints: ConstraintSet
    plans: EntitlementPlans = field(default_factory=EntitlementPlans)
    labels: DataLabels = field(default_factory=DataLabels)

    @property
    def has_log_only(self) -> bool:
        return any(p.mode == "log_only" for p in self.policies.values())

    def approval_s(self, ids: tuple[str, ...]) -> int:
        """How long an approval lifting the given forbids stays valid (the shortest)."""
        return min(self.policies[i].approval_s or MAX_APPROVAL_S for i in ids)


def _subset(static: dict[str, Any], keep: list[str], path: Path) -> PolicySubset:
    chosen = {cedar_id: static[cedar_id] for cedar_id in keep}
    if not chosen:
        return PolicySubset(cedarpy.PolicySet.from_str(""), {})
    try:
        text = cedarpy.policies_from_json_str(
            json.dumps({"staticPolicies": chosen, "templates": {}, "templateLinks": []})
        )
        reparsed = json.loads(cedarpy.policies_to_json_str(text))["staticPolicies"]
        policy_set = cedarpy.PolicySet.from_str(text)
    except Exception as e:  # cedarpy raises bare exceptions
        raise BundleError(f"cannot build policy set: {e}", path=path) from e
    names = {cid: p["annotations"]["id"] for cid, p in reparsed.items()}
    return PolicySubset(policy_set, names)


def _info(cedar_id: str, policy_json: dict[str, Any], path: Path) -> PolicyInfo:
    annotations = policy_json.get("annotations") or {}
    ident = annotations.get("id")
    if not ident:
        raise BundleError(f"every policy needs an @id annotation ({cedar_id} has none)", path=path)
    mode = annotations.get("mode", "enforce")
    if mode not in MODES:
        raise BundleError(f"{ident}: @mode must be one of {', '.join(MODES)}", path=path)
    approval_s = None
    if "approval" in annotations:
        if policy_json.get("effect") != "forbid":
            raise BundleError(
                f"{ident}: @approval belongs on a forbid policy (forbidden unless approved)",
                path=path,
            )
        try:
            approval_s = parse_duration(annotations["approval"])
        except ValueError as e:
            raise BundleError(f"{ident}: @approval: {e}", path=path) from None
        if approval_s > MAX_APPROVAL_S:
            raise BundleError(f"{ident}: @approval: at most 30d", path=path)
    return PolicyInfo(ident, str(policy_json.get("effect")), mode, approval_s)


def load_bundle(path: Path) -> PolicyBundle:
    """Load and validate the bundle in ``path`` or raise BundleError."""
    if not path.is_dir():
        raise BundleError("policy bundle directory does not exist", path=path)
    schema_path = path / SCHEMA_FILE
    if not schema_path.is_file():
        raise BundleError(f"missing {SCHEMA_FILE}", path=path)
    policy_files = sorted(p for p in path.iterdir() if p.suffix == POLICY_SUFFIX and p.is_file())
    if not policy_files:
        raise BundleError(f"no *{POLICY_SUFFIX} policy files", path=path)

    try:
        files = bundle_files(path)
        schema_text = schema_path.read_text(encoding="utf-8")
        policies_text = "\n".join(p.read_text(encoding="utf-8") for p in policy_files)
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read bundle: {e}", path=path) from e
    version = digest(files)

    try:
        static = json.loads(cedarpy.policies_to_json_str(policies_text))["staticPolicies"]
    except Exception as e:  # cedarpy raises bare exceptions on syntax errors
        raise BundleError(f"Cedar syntax error: {e}", path=path) from e
    infos: dict[str, PolicyInfo] = {}
    by_cedar_id: dict[str, PolicyInfo] = {}
    for cedar_id, policy_json in static.items():
        info = _info(cedar_id, policy_json, path)
        if info.id in infos:
            raise BundleError(f"duplicate policy @id {info.id!r}", path=path)
        infos[info.id] = info
        by_cedar_id[cedar_id] = info

    result = cedarpy.validate_policies(policies_text, schema_text)
    if not result.validation_passed:
        problems = "; ".join(
            f"{by_cedar_id[e.policy_id].id if e.policy_id in by_cedar_id else e.policy_id}: "
            f"{e.error}"
            for e in result.errors
        )
        raise BundleError(f"policies fail schema validation: {problems}", path=path)
    try:
        schema = cedarpy.Schema.from_str(schema_text)
    except Exception as e:
        raise BundleError(f"cannot parse schema: {e}", path=path) from e

    enforced = [c for c, i in by_cedar_id.items() if i.mode == "enforce"]
    constraints, plans, labels = load_constraints(path), load_plans(path), load_labels(path)
    try:
        unchanged = bundle_files(path) == files
    except OSError:
        unchanged = False
    if not unchanged:  # the version must name exactly the files that were loaded
        raise BundleError("the bundle changed while it was being loaded", path=path)
    return PolicyBundle(
        path=path,
        version=version,
        policies_text=policies_text,
        schema_text=schema_text,
        policies=infos,
        files=files,
        enforced=_subset(static, enforced, path),
        log_only=_subset(static, [c for c, i in by_cedar_id.items() if i.mode == "log_only"], path),
        unapproved=_subset(
            static, [c for c in enforced if by_cedar_id[c].approval_s is None], path
        ),
        schema=schema,
        constraints=constraints,
        plans=plans,
        labels=labels,
    )


def bundle_files(path: Path) -> dict[str, str]:
    """Every file of the bundle (relative name -> SHA-256 of its bytes); the version's input."""
    return {
        file.relative_to(path).as_posix(): sha256_hex(file.read_bytes())
        for file in sorted(p for p in path.rglob("*") if p.is_file())
    }
