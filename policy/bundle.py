"""Policy bundles: a directory of Cedar policies, a Cedar schema and policy tests.

A bundle's version is the SHA-256 of its contents (file names and bytes), so the
same files always make the same version and any change makes a new one. A bundle
is validated against its schema at load; one that fails is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cedarpy

from policy.constraints import ConstraintSet, load_constraints
from policy.errors import BundleError
from toolplane.canonical import digest, sha256_hex

POLICY_SUFFIX = ".cedar"
SCHEMA_FILE = "schema.cedarschema"

__all__ = ["PolicyBundle", "load_bundle"]


@dataclass(frozen=True)
class PolicyBundle:
    path: Path
    version: str
    policies_text: str
    schema_text: str
    policy_names: dict[str, str]  # Cedar's "policyN" -> our @id annotation
    files: dict[str, str]  # relative name -> sha256 of its bytes
    policy_set: cedarpy.PolicySet
    schema: cedarpy.Schema
    constraints: ConstraintSet


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

    files: dict[str, str] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        files[file.relative_to(path).as_posix()] = sha256_hex(file.read_bytes())
    version = digest(files)

    try:
        schema_text = schema_path.read_text(encoding="utf-8")
        policies_text = "\n".join(p.read_text(encoding="utf-8") for p in policy_files)
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read bundle: {e}", path=path) from e

    try:
        as_json = json.loads(cedarpy.policies_to_json_str(policies_text))
    except Exception as e:  # cedarpy raises bare exceptions on syntax errors
        raise BundleError(f"Cedar syntax error: {e}", path=path) from e
    names: dict[str, str] = {}
    for cedar_id, policy_json in as_json.get("staticPolicies", {}).items():
        annotated = (policy_json.get("annotations") or {}).get("id")
        if not annotated:
            raise BundleError(
                f"every policy needs an @id annotation ({cedar_id} has none)", path=path
            )
        if annotated in names.values():
            raise BundleError(f"duplicate policy @id {annotated!r}", path=path)
        names[cedar_id] = annotated

    result = cedarpy.validate_policies(policies_text, schema_text)
    if not result.validation_passed:
        problems = "; ".join(
            f"{names.get(err.policy_id, err.policy_id)}: {err.error}" for err in result.errors
        )
        raise BundleError(f"policies fail schema validation: {problems}", path=path)

    try:
        policy_set = cedarpy.PolicySet.from_str(policies_text)
        schema = cedarpy.Schema.from_str(schema_text)
    except Exception as e:
        raise BundleError(f"cannot parse bundle: {e}", path=path) from e

    return PolicyBundle(
        path=path,
        version=version,
        policies_text=policies_text,
        schema_text=schema_text,
        policy_names=names,
        files=files,
        policy_set=policy_set,
        schema=schema,
        constraints=load_constraints(path),
    )
