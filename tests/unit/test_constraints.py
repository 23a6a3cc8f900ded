"""Policy constraints: limits only go down, hosts only get fewer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from policy.bundle import load_bundle
from policy.constraints import ConstraintSet, load_constraints
from policy.errors import BundleError
from sandbox_tasks.registry import constrained
from tests.fixture_tools import TOOLS

DEFAULT = Path(__file__).resolve().parents[2] / "policy" / "bundles" / "default"


def bundle_with(tmp_path: Path, rules: object) -> Path:
    shutil.copytree(DEFAULT, tmp_path / "b")
    (tmp_path / "b" / "constraints.json").write_text(json.dumps(rules))
    return tmp_path / "b"


def test_matching_rules_lower_limits_and_intersect_hosts(tmp_path: Path) -> None:
    rules = {
        "rules": [
            {"tool": "*", "limits": {"timeout_s": 9, "memory_mb": 300}},
            {
                "tool": "fetcher",
                "environment": "prod",
                "limits": {"timeout_s": 2},
                "egress": ["a:443", "b:443"],
            },
            {"tool": "fetcher", "classification": "confidential", "egress": ["b:443"]},
            {"tool": "other", "limits": {"timeout_s": 0.5}},
        ]
    }
    constraints = load_constraints(bundle_with(tmp_path, rules))
    prod = constraints.for_call(tool="fetcher", environment="prod", classification="confidential")
    assert prod.limits == {"timeout_s": 2, "memory_mb": 300}
    assert prod.egress == ("b:443",)
    dev = constraints.for_call(tool="fetcher", environment="dev", classification="internal")
    assert dev.limits == {"timeout_s": 9, "memory_mb": 300} and dev.egress is None


def test_private_egress_is_united_over_rules_and_kept_within_the_hosts(tmp_path: Path) -> None:
    rules = {
        "rules": [
            {"tool": "fetcher", "private_egress": ["crm.internal:443"]},
            {"tool": "*", "environment": "dev", "private_egress": ["127.0.0.1:8080"]},
            {"tool": "fetcher", "classification": "confidential", "egress": ["crm.internal:443"]},
        ]
    }
    constraints = load_constraints(bundle_with(tmp_path, rules))
    dev = constraints.for_call(tool="fetcher", environment="dev", classification="internal")
    assert dev.private_egress == ("127.0.0.1:8080", "crm.internal:443") and dev.egress is None
    prod = constraints.for_call(tool="fetcher", environment="prod", classification="internal")
    assert prod.private_egress == ("crm.internal:443",)
    # an egress rule narrows the hosts: private_egress grants none beyond them
    narrowed = constraints.for_call(
        tool="fetcher", environment="dev", classification="confidential"
    )
    assert narrowed.private_egress == ("crm.internal:443",)
    assert narrowed.as_dict()["private_egress"] == ["crm.internal:443"]
    other = constraints.for_call(tool="other", environment="prod", classification="internal")
    assert other.private_egress == ()


def test_bundle_version_covers_constraints(tmp_path: Path) -> None:
    a = load_bundle(bundle_with(tmp_path / "1", {"rules": []}))
    b = load_bundle(bundle_with(tmp_path / "2", {"rules": [{"tool": "*", "limits": {"cpu_s": 1}}]}))
    assert a.version != b.version


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"rules": [{"tool": "x", "limits": {"timeout_s": -1}}]}, "rules.0.limits.timeout_s"),
        ({"rules": [{"tool": "x", "limits": {"threads": 2}}]}, "rules.0.limits.threads"),
        ({"rules": [{"tool": "x", "egress": "a:1"}]}, "rules.0.egress"),
        ({"rules": [{"tool": "x", "private_egress": "a:1"}]}, "rules.0.private_egress"),
        ({"rule": []}, "rules"),
        ("not json", ""),
    ],
)
def test_malformed_constraints_refuse_the_bundle(
    tmp_path: Path, rules: object, message: str
) -> None:
    path = bundle_with(tmp_path, rules)
    if rules == "not json":
        (path / "constraints.json").write_text("{nope")
    with pytest.raises(BundleError, match="constraints.json") as raised:
        load_bundle(path)
    assert message in str(raised.value)


def test_constrained_never_raises_a_limit_nor_adds_a_host() -> None:
    fetcher = next(t for t in TOOLS if t.name == "fetcher")
    fetcher = constrained(fetcher, None, None)
    spec = constrained(fetcher, {"timeout_s": 1000, "memory_mb": 64, "unknown": 1}, ["evil:80"])
    assert spec.limits.timeout_s == fetcher.limits.timeout_s  # not raised
    assert spec.limits.memory_mb == 64 and isinstance(spec.limits.memory_mb, int)
    assert spec.egress == ()
    assert ConstraintSet().for_call(tool="a", environment="b", classification="c").limits == {}
